"""The Triton kernels behind :mod:`sidnet.kernels.int8` (plain ``@triton.jit`` functions; the launchers are in
:mod:`.launch` and :mod:`.ops`). Triton is optional: on a CPU-only install ``triton`` is ``None`` and nothing here is
defined but :func:`interpreting`, :func:`available` and ``None`` in place of each kernel."""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of PyTorch; on a CPU-only install it may be missing
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None
try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - an older Triton: the pointer kernel only
    TensorDescriptor = None

# The kernels round half-to-even as (v + 1.5·2^23) - 1.5·2^23 in float32 (exact for |v| < 2^22, here |v| <= 128).


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``): the kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device) -> bool:
    """Whether :func:`conv2d_int8` can launch its Triton kernel for tensors on ``device``."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


if triton is not None:

    @triton.jit
    def _requantise(y, out_scale, ratio, REQUANT: tl.constexpr):
        # QuantizeLinear of y (clamp, round half to even), then the pool's QuantizeLinear at another scale.
        q = tl.minimum(tl.maximum(y / out_scale, -128.0), 127.0)
        q = (q + 12582912.0) - 12582912.0
        if REQUANT:
            q = tl.minimum(tl.maximum(q * ratio, -128.0), 127.0)
            q = (q + 12582912.0) - 12582912.0
        return q

    @triton.jit
    def _epilogue(acc, rows, r_ok, rn, n_ok, scale_ptr, bias_ptr, out_ptr, CO, out_scale, ratio, RELU: tl.constexpr,
                  OUT_Q: tl.constexpr, FP8: tl.constexpr, REQUANT: tl.constexpr):  # fmt: skip
        # y = acc · (s_x · s_w[co]) + bias[co], ReLU, then int8 (or e4m3) at the next scale or a float store; output
        # row ``rows[i]`` of the (rows, CO) NHWC output.
        scale = tl.load(scale_ptr + rn, mask=n_ok, other=0.0)
        bias = tl.load(bias_ptr + rn, mask=n_ok, other=0.0)
        y = acc.to(tl.float32) * scale[None, :] + bias[None, :]
        if RELU:
            y = tl.maximum(y, 0.0)
        offs = rows.to(tl.int64)[:, None] * CO + rn[None, :]
        ok = r_ok[:, None] & n_ok[None, :]
        if OUT_Q:
            if FP8:
                q = tl.minimum(tl.maximum(y / out_scale, -448.0), 448.0)
                tl.store(out_ptr + offs, q.to(tl.float8e4nv).to(tl.int8, bitcast=True), mask=ok)
            else:
                tl.store(out_ptr + offs, _requantise(y, out_scale, ratio, REQUANT=REQUANT).to(tl.int8), mask=ok)
        else:
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _tile_order(pid, num_m, num_n, GROUP_M: tl.constexpr):
        # Grouped tile order: GROUP_M row tiles share each weight column tile while it is in L2.
        width = GROUP_M * num_n
        first_m = (pid // width) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % width) % size_m, (pid % width) // size_m

    @triton.jit
    def _conv_q8_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, H, W, C, HO, WO, CO, stride, pad, out_scale,
                        ratio, KH: tl.constexpr, KW: tl.constexpr, RELU: tl.constexpr, OUT_Q: tl.constexpr,
                        FP8: tl.constexpr, GATHER: tl.constexpr, EVEN_C: tl.constexpr, POOL: tl.constexpr,
                        REQUANT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        GROUP_M: tl.constexpr, SPLIT: tl.constexpr = 1):  # fmt: skip
        # SPLIT > 1 (split-K, for layers with too few output tiles to fill the GPU): program (tile, k) sums the k-th
        # part of the reduction and adds its INT32 partial sums into out_ptr, a zeroed int32 (M, CO) workspace
        # (integer addition: exact in any order); _split_epilogue_kernel finishes.
        pid_m, pid_n = _tile_order(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(CO, BN), GROUP_M=GROUP_M)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        m_ok = rm < M
        n_ok = rn < CO
        if POOL > 1:  # rows in (pooled pixel, position in its POOL×POOL window) order: a window's rows share a tile
            pooled = rm // (POOL * POOL)
            pos = rm % (POOL * POOL)
            img = (pooled // ((HO // POOL) * (WO // POOL))).to(tl.int64)
            rem = pooled % ((HO // POOL) * (WO // POOL))
            oh = (rem // (WO // POOL)) * POOL + pos // POOL
            ow = (rem % (WO // POOL)) * POOL + pos % POOL
        else:
            img = (rm // (HO * WO)).to(tl.int64)
            rem = rm % (HO * WO)
            oh = rem // WO
            ow = rem % WO
        ih0 = oh * stride - pad
        iw0 = ow * stride - pad
        ktot = KH * KW * C
        # The weight is (CO, KH, KW, C): each output channel's reduction is contiguous, so the B tile is K-major,
        # the operand layout Hopper's 8-bit warpgroup MMA reads from shared memory.
        w_cols = w_ptr + rn.to(tl.int64)[None, :] * ktot
        if FP8:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.int32)
        if GATHER:  # small C (the stem): one flattened reduction over (r, s, c), gathered per element
            for k0 in range(0, ktot, BK):
                kk = k0 + rk
                k_ok = kk < ktot
                r = kk // (KW * C)
                s = (kk // C) % KW
                ih = r[:, None] + ih0[None, :]  # (K, M), transposed after the load: lanes along the pixels
                iw = s[:, None] + iw0[None, :]
                ok = k_ok[:, None] & m_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a = tl.load(x_ptr + ((img[None, :] * H + ih) * W + iw) * C + (kk % C)[:, None], mask=ok, other=0.0)
                a = tl.trans(a)
                b = tl.load(w_cols + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc)
        else:  # one loop over (r, s, channel block): long enough for the software pipeline to overlap loads
            cb = tl.cdiv(C, BK)
            chunk = tl.cdiv(KH * KW * cb, SPLIT)
            t_lo = tl.program_id(1) * chunk
            for t in range(t_lo, tl.minimum(t_lo + chunk, KH * KW * cb)):
                rs = t // cb
                c0 = (t - rs * cb) * BK
                r = rs // KW
                ih = ih0 + r
                iw = iw0 + (rs - r * KW)
                pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                kc = c0 + rk
                a_ptr = x_ptr + (((img * H + ih) * W + iw) * C)[:, None] + kc[None, :]
                b_ptr = w_cols + (rs * C + kc)[:, None]
                if EVEN_C:
                    a = tl.load(a_ptr, mask=pix_ok[:, None], other=0.0)
                    b = tl.load(b_ptr, mask=n_ok[None, :], other=0.0)
                else:
                    k_ok = kc < C
                    a = tl.load(a_ptr, mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
                    b = tl.load(b_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc)
        if POOL > 1:  # the max of each window's sums: the epilogue is monotonic (scale > 0), so this is the pool
            acc = tl.max(tl.reshape(acc, (BM // (POOL * POOL), POOL * POOL, BN)), axis=1)
            ro = pid_m * (BM // (POOL * POOL)) + tl.arange(0, BM // (POOL * POOL))
            r_ok = ro < M // (POOL * POOL)
        else:
            ro = rm
            r_ok = m_ok
        if SPLIT > 1:
            ok = r_ok[:, None] & n_ok[None, :]
            tl.atomic_add(out_ptr + ro.to(tl.int64)[:, None] * CO + rn[None, :], acc, mask=ok)
        else:
            _epilogue(acc, ro, r_ok, rn, n_ok, scale_ptr, bias_ptr, out_ptr, CO, out_scale, ratio, RELU=RELU,
                      OUT_Q=OUT_Q, FP8=FP8, REQUANT=REQUANT)  # fmt: skip

    @triton.jit
    def _split_epilogue_kernel(acc_ptr, scale_ptr, bias_ptr, out_ptr, M, CO, out_scale, RELU: tl.constexpr,
                               OUT_Q: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):  # fmt: skip
        # The epilogue of a split-K convolution, on the summed int32 (M, CO) workspace.
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        ok = (rm < M)[:, None] & (rn < CO)[None, :]
        acc = tl.load(acc_ptr + rm.to(tl.int64)[:, None] * CO + rn[None, :], mask=ok, other=0)
        _epilogue(acc, rm, rm < M, rn, rn < CO, scale_ptr, bias_ptr, out_ptr, CO, out_scale, 1.0, RELU=RELU,
                  OUT_Q=OUT_Q, FP8=False, REQUANT=False)  # fmt: skip

    @triton.jit
    def _conv_tma_kernel(x_desc, w_desc, scale_ptr, bias_ptr, out_ptr, H, W, C, HO, WO, CO, tiles_h, tiles_w, num_m,
                         out_scale, ratio, KH: tl.constexpr, KW: tl.constexpr, PAD: tl.constexpr, RELU: tl.constexpr,
                         OUT_Q: tl.constexpr, FP8: tl.constexpr, POOL: tl.constexpr, REQUANT: tl.constexpr,
                         BH: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         GROUP_M: tl.constexpr):  # fmt: skip
        # A stride-1 convolution whose operands arrive by TMA: the output tile is a BH × BW block of one image's
        # pixels, and the A tile of tap (r, s) is the same block shifted by (r - PAD, s - PAD), loaded as one 4-D box
        # of the NHWC input; the copy engine fills the rows and columns outside the image with zeros (the padding),
        # so the loop has no address arithmetic and no masks. Weights: (CO, KH·KW·C) K-major boxes.
        pid_m, pid_n = _tile_order(tl.program_id(0), num_m, tl.cdiv(CO, BN), GROUP_M=GROUP_M)
        img = pid_m // (tiles_h * tiles_w)
        rem = pid_m % (tiles_h * tiles_w)
        h0 = (rem // tiles_w) * BH
        w0 = (rem % tiles_w) * BW
        n0 = pid_n * BN
        if FP8:
            acc = tl.zeros((BH * BW, BN), dtype=tl.float32)
        else:
            acc = tl.zeros((BH * BW, BN), dtype=tl.int32)
        cb = tl.cdiv(C, BK)
        for t in range(0, KH * KW * cb):
            rs = t // cb
            c0 = (t - rs * cb) * BK
            r = rs // KW
            a = x_desc.load([img, h0 + r - PAD, w0 + (rs - r * KW) - PAD, c0]).reshape(BH * BW, BK)
            b = w_desc.load([n0, rs * C + c0])  # a channel block past C meets zeros in A, so its B values never count
            acc = tl.dot(a, b.T, acc)
        rn = n0 + tl.arange(0, BN)
        if POOL > 1:  # BH, BW and the tile origin are multiples of POOL: the tile holds whole windows
            acc = tl.reshape(acc, (BH // POOL, POOL, BW // POOL, POOL, BN))
            acc = tl.max(tl.max(acc, axis=3), axis=1)
            acc = tl.reshape(acc, ((BH // POOL) * (BW // POOL), BN))
            i = tl.arange(0, (BH // POOL) * (BW // POOL))
            oh = h0 // POOL + i // (BW // POOL)
            ow = w0 // POOL + i % (BW // POOL)
            ok = (oh < HO // POOL) & (ow < WO // POOL)
            rows = (img.to(tl.int64) * (HO // POOL) + oh) * (WO // POOL) + ow
        else:
            i = tl.arange(0, BH * BW)
            oh = h0 + i // BW
            ow = w0 + i % BW
            ok = (oh < HO) & (ow < WO)
            rows = (img.to(tl.int64) * HO + oh) * WO + ow
        _epilogue(acc, rows, ok, rn, rn < CO, scale_ptr, bias_ptr, out_ptr, CO, out_scale, ratio, RELU=RELU,
                  OUT_Q=OUT_Q, FP8=FP8, REQUANT=REQUANT)  # fmt: skip

    @triton.jit
    def _stem_int8_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, H, W, PH, PW, CO, in_scale, conv_scale,
                          ratio, C: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, PAD: tl.constexpr,
                          POOL: tl.constexpr, PACKED: tl.constexpr, REQUANT: tl.constexpr, BM: tl.constexpr,
                          BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
        # One tile of pooled output pixels. Each pooled pixel's input window (WH × WW pixels: every conv position
        # under it) is loaded once; the conv at pool position p is the dot of that window with the weight placed at
        # p's offset in the window (zeros elsewhere, :func:`stem_window_weights`); the max of the POOL² INT32 sums
        # (the epilogue is monotonic for a positive scale, so this equals pooling the requantised outputs), one
        # epilogue, int8 NHWC out.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        m_ok = rm < M
        n_ok = rn < CO
        img = (rm // (PH * PW)).to(tl.int64)
        rem = rm % (PH * PW)
        ih0 = (rem // PW) * POOL - PAD
        iw0 = (rem % PW) * POOL - PAD
        ktot = WH * WW * 4
        k_ok = rk < ktot
        if PACKED:  # int8 (N, H, W, 4) from _quantize_nhwc4_kernel; k = (i, j, c): a window row is 4·WW bytes
            i = rk // (WW * 4)
            ih = ih0[:, None] + i[None, :]
            iw = iw0[:, None] + ((rk // 4) % WW)[None, :]
            ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_ptr + ((img[:, None] * H + ih) * W + iw0[:, None]) * 4 + (rk % (WW * 4))[None, :],
                        mask=ok, other=0)  # fmt: skip
        else:  # the float NCHW images, quantised on load; k = (c, i, j) with c < 4 (the 4th is padding)
            c = rk // (WH * WW)
            ih = ih0[:, None] + ((rk // WW) % WH)[None, :]
            iw = iw0[:, None] + (rk % WW)[None, :]
            ok = m_ok[:, None] & (c < C)[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            v = tl.load(x_ptr + ((img[:, None] * C + c[None, :]) * H + ih) * W + iw, mask=ok, other=0.0)
            q = tl.minimum(tl.maximum(tl.math.div_rn(v.to(tl.float32), in_scale), -128.0), 127.0)
            a = ((q + 12582912.0) - 12582912.0).to(tl.int8)
        best = tl.full((BM, BN), -2147483647, tl.int32)
        for p in tl.static_range(POOL * POOL):
            b = tl.load(w_ptr + (p * CO + rn[None, :]) * ktot + rk[:, None], mask=k_ok[:, None] & n_ok[None, :],
                        other=0)  # fmt: skip
            best = tl.maximum(best, tl.dot(a, b))
        scale = tl.load(scale_ptr + rn, mask=n_ok, other=0.0)
        bias = tl.load(bias_ptr + rn, mask=n_ok, other=0.0)
        y = tl.maximum(best.to(tl.float32) * scale[None, :] + bias[None, :], 0.0)
        q = _requantise(y, conv_scale, ratio, REQUANT=REQUANT)
        offs = rm.to(tl.int64)[:, None] * CO + rn[None, :]
        tl.store(out_ptr + offs, q.to(tl.int8), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _quantize_nhwc4_kernel(x_ptr, out_ptr, P, HW, in_scale, C: tl.constexpr, BLOCK: tl.constexpr):
        # QuantizeLinear of float NCHW (C <= 4) into int8 NHWC padded to 4 channels: one int32 word per pixel.
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < P
        img = (offs // HW).to(tl.int64)
        hw = offs % HW
        word = tl.zeros((BLOCK,), dtype=tl.int32)
        for c in tl.static_range(C):
            v = tl.load(x_ptr + (img * C + c) * HW + hw, mask=ok, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(tl.math.div_rn(v, in_scale), -128.0), 127.0)
            q = ((q + 12582912.0) - 12582912.0).to(tl.int32)
            word = word | ((q & 255) << (8 * c))
        tl.store(out_ptr + offs, word, mask=ok)

    @triton.jit
    def _maxpool_int8_kernel(x_ptr, out_ptr, total, H, W, C, HO, WO, stride, pad, ratio, K: tl.constexpr,
                             REQUANT: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < total
        c = offs % C
        pix = offs // C
        ow = pix % WO
        oh = (pix // WO) % HO
        img = pix // (WO * HO)
        best = tl.full((BLOCK,), -128, tl.int32)
        for r in tl.static_range(K):
            for s in tl.static_range(K):
                ih = oh * stride - pad + r
                iw = ow * stride - pad + s
                inside = ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                v = tl.load(x_ptr + ((img.to(tl.int64) * H + ih) * W + iw) * C + c, mask=inside, other=-128)
                best = tl.maximum(best, v.to(tl.int32))
        if REQUANT:
            q = tl.minimum(tl.maximum(best.to(tl.float32) * ratio, -128.0), 127.0)
            best = ((q + 12582912.0) - 12582912.0).to(tl.int32)
        tl.store(out_ptr + offs, best.to(tl.int8), mask=ok)

    @triton.jit
    def _maxpool_fp8_kernel(x_ptr, out_ptr, total, H, W, C, HO, WO, stride, pad, ratio, K: tl.constexpr,
                            BLOCK: tl.constexpr):  # fmt: skip
        # Max pooling of e4m3 NHWC, requantised by ratio = in_scale / out_scale (e4m3 rounding of the product).
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < total
        c = offs % C
        pix = offs // C
        ow = pix % WO
        oh = (pix // WO) % HO
        img = pix // (WO * HO)
        best = tl.full((BLOCK,), -448.0, tl.float32)
        for r in tl.static_range(K):
            for s in tl.static_range(K):
                ih = oh * stride - pad + r
                iw = ow * stride - pad + s
                inside = ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                v = tl.load(x_ptr + ((img.to(tl.int64) * H + ih) * W + iw) * C + c, mask=inside, other=-448.0)
                best = tl.maximum(best, v.to(tl.float32))
        q = tl.minimum(tl.maximum(best * ratio, -448.0), 448.0)
        tl.store(out_ptr + offs, q.to(tl.float8e4nv), mask=ok)
else:  # pragma: no cover - without Triton the launchers run the reference (``available`` is False)
    _conv_q8_kernel = _split_epilogue_kernel = _conv_tma_kernel = _stem_int8_kernel = None
    _quantize_nhwc4_kernel = _maxpool_int8_kernel = _maxpool_fp8_kernel = None
