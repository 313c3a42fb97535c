"""INT8 tensor-core kernels (Triton): implicit-GEMM convolution and max pooling on NHWC int8 activations.

:func:`conv2d_int8` computes ``acc[m, co] = Σ x_q · w_q`` as INT8 × INT8 → INT32 on the tensor cores (``tl.dot`` on
int8 tiles), then, in the same kernel, the epilogue of a Q/DQ graph's ``DQ → Conv → (Relu) → Q``:
``y = acc · (s_x · s_w[co]) + bias[co]``, ReLU, and either requantisation to the next layer's scale
(``clamp(round_half_even(y / s_out), -128, 127)``, the ``QuantizeLinear`` rounding) or a float16/float32 store for a
layer that the accuracy gate kept out of INT8. :func:`maxpool2d_int8` pools int8 directly (max commutes with a
positive scale) and requantises when the next ``QuantizeLinear`` has another scale.

Launchers take plain tensors and numbers (no graph knowledge); :mod:`sidnet.quant.int8_plan` decides what runs.
``reference_conv2d_int8`` is the exact integer reference the tests hold the kernel to (float64 convolution of the
int8 values: every partial sum is an integer below 2^53, so it is exact), with the same epilogue in PyTorch; it is
also what runs where Triton cannot (a CPU without ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

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


@dataclass(frozen=True)
class Tiles:
    """A launch configuration of the convolution kernel: the output tile (bm pixels × bn channels), the reduction
    step bk, warps, software-pipeline stages and the grouped tile order's group height. ``tma``: the TMA kernel
    (stride 1; its tile is ``bh`` rows × ``bm // bh`` columns of one image, or ``bm`` consecutive pixels for a 1×1
    convolution without padding) instead of the pointer-gather kernel. ``split``: the pointer kernel's reduction
    split over that many programs per tile (split-K, INT8 without a fused pool), summed in an int32 workspace."""

    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    group: int = 8
    tma: bool = False
    bh: int = 1
    split: int = 1


def default_tiles(*, m: int, c: int, co: int, taps: int) -> Tiles:
    """The kernel's configuration for a layer (m output pixels, c → co channels, taps = KH·KW), from the per-layer
    sweep on an H100 (``benchmarks/int8_conv_sweep.py``, ``benchmarks/results/int8_tensorcores/``): 128-pixel tiles,
    256 channels wide for the 1024-channel 3×3s, 64 for the 1×1s, a 128-channel reduction step where the layer has
    it; 64×64 tiles where the big ones would leave most SMs idle (batch 1); small tiles in the interpreter."""
    if interpreting():
        return Tiles(32, 32, 32, 4, 1, 1)
    bk = 32 if c < 16 else min(128, max(32, triton.next_power_of_2(c)))
    if taps == 1:
        bn, bk = 64, min(bk, 64)
    else:
        bn = 256 if co >= 1024 else min(128, max(32, triton.next_power_of_2(co)))
    bm = 128
    if triton.cdiv(m, bm) * triton.cdiv(co, bn) < 264:  # under two waves of CTAs on a 132-SM GPU
        bm, bn = 64, min(bn, 64)
    return Tiles(bm, bn, bk, 8 if bm * bn >= 128 * 256 else 4, 3 if bk >= 128 else 4)


def conv_output_size(size: int, *, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def conv2d_int8(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    *,
    stride: int,
    pad: int,
    relu: bool,
    out_scale: float | None,
    out_dtype: torch.dtype = torch.float16,
    tiles: Tiles | None = None,
    pool: int = 1,
    pool_scale: float | None = None,
    tune: bool = False,
) -> torch.Tensor:
    """INT8 convolution with the fused epilogue.

    Args:
        x: int8 (N, H, W, C), contiguous (NHWC).
        w: int8 (CO, KH, KW, C), contiguous (torch's channels-last weight order: the GEMM's B operand K-major).
        scale: float32 (CO,) = ``s_x · s_w[co]``; bias: float32 (CO,).
        out_scale: the next ``QuantizeLinear``'s scale (int8 output), or ``None`` for a float output.
        out_dtype: the float output's dtype when ``out_scale`` is ``None``.
        tiles: the launch configuration (default: the one tuning chose for this launch, else :func:`default_tiles`).
        tune: on a CUDA device, when no configuration was chosen for this launch yet (shapes, epilogue) and no CUDA
            graph is being captured, time :func:`candidate_tiles` once (the pointer kernel and TMA tiles) and keep
            the fastest for every later call; like cuDNN's benchmark mode, it never changes the output.
        pool: a ``pool``×``pool`` stride-``pool`` max pool (no padding, floor mode) of the int8 output in the same
            kernel, requantised from ``out_scale`` to ``pool_scale`` (default: the same scale); 1: none.

    Returns:
        (N, HO, WO, CO) int8 or ``out_dtype``; (N, HO // pool, WO // pool, CO) int8 with a pool.
    """
    _check(x, w, torch.int8, "conv2d_int8")
    if pool > 1 and out_scale is None:
        raise ValueError("conv2d_int8: a fused max pool needs the int8 output (out_scale)")
    pool_scale = out_scale if pool_scale is None else pool_scale
    if not available(x.device):
        y = reference_conv2d_int8(x, w, scale, bias, stride=stride, pad=pad, relu=relu, out_scale=out_scale,
                                  out_dtype=out_dtype)  # fmt: skip
        if pool > 1:
            y = maxpool2d_int8(y, kernel=pool, stride=pool, pad=0, in_scale=out_scale, out_scale=pool_scale)
        return y
    return _launch(x, w, scale, bias, stride=stride, pad=pad, relu=relu, out_scale=out_scale, out_dtype=out_dtype,
                   tiles=tiles, q_dtype=torch.int8, pool=pool, pool_scale=pool_scale, tune=tune)  # fmt: skip


def conv2d_fp8(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    *,
    stride: int,
    pad: int,
    relu: bool,
    out_scale: float | None,
    out_dtype: torch.dtype = torch.float16,
    tiles: Tiles | None = None,
    tune: bool = False,
    pool: int = 1,
) -> torch.Tensor:
    """:func:`conv2d_int8` in FP8 (e4m3) with FP32 accumulation: the same layouts, epilogue and tuning; a quantised
    output is ``clamp(y / out_scale, ±448)`` rounded to e4m3. With a fused ``pool``, the window's maximum is
    quantised once, at ``out_scale`` (pass the pool's output scale). CUDA (sm_89+) only."""
    _check(x, w, torch.float8_e4m3fn, "conv2d_fp8")
    if x.device.type != "cuda" or triton is None:
        raise RuntimeError(f"conv2d_fp8 runs on a CUDA GPU with Triton (got a {x.device.type} tensor)")
    if pool > 1 and out_scale is None:
        raise ValueError("conv2d_fp8: a fused max pool needs the e4m3 output (out_scale)")
    return _launch(x, w, scale, bias, stride=stride, pad=pad, relu=relu, out_scale=out_scale, out_dtype=out_dtype,
                   tiles=tiles, q_dtype=torch.float8_e4m3fn, tune=tune, pool=pool)  # fmt: skip


def _check(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    if x.dtype != dtype or w.dtype != dtype or x.shape[3] != w.shape[3] or not x.is_contiguous() \
            or not w.is_contiguous():  # fmt: skip
        raise ValueError(f"{name}: x {dtype} NHWC (N, H, W, C) and w {dtype} (CO, KH, KW, C), contiguous; got "
                         f"{x.dtype} {tuple(x.shape)} and {w.dtype} {tuple(w.shape)}")  # fmt: skip


def _launch(x, w, scale, bias, *, stride, pad, relu, out_scale, out_dtype, tiles, q_dtype, pool=1,
            pool_scale=None, tune=False) -> torch.Tensor:  # fmt: skip
    n, h, wd, c = x.shape
    co, kh, kw, _ = w.shape
    ho = conv_output_size(h, kernel=kh, stride=stride, pad=pad)
    wo = conv_output_size(wd, kernel=kw, stride=stride, pad=pad)
    out = torch.empty((n, ho // pool, wo // pool, co), dtype=q_dtype if out_scale is not None else out_dtype,
                      device=x.device)  # fmt: skip
    # FP8: the operands stay float8 tensors (the kernels load e4m3 directly: Triton keeps FP8 warpgroup MMAs in
    # flight across loop iterations, which it does not do for INT8), a quantised output is stored as its bit pattern
    dst = out.view(torch.int8) if out.dtype == q_dtype else out
    ratio = float(out_scale / pool_scale) if pool > 1 else 1.0
    m = n * (ho // pool) * (wo // pool) * pool * pool  # the conv rows computed (with a pool: whole windows only)
    problem = _Problem(x=x, w=w, scale=scale, bias=bias, out=dst, stride=stride, pad=pad, relu=relu,
                       out_scale=float(out_scale if out_scale is not None else 1.0), out_q=out_scale is not None,
                       fp8=q_dtype != torch.int8, pool=pool, ratio=ratio, ho=ho, wo=wo)  # fmt: skip
    t = tiles
    if t is None and tune:
        key = problem.key()
        t = _TUNED.get(key)
        if t is None and x.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            t = _TUNED[key] = _tune(problem)
    if t is None:
        t = default_tiles(m=m, c=c, co=co, taps=kh * kw)
    problem.run(t)
    _LAST[0] = (problem.key(), t)
    return out


@dataclass
class _Problem:
    """One convolution launch (operands, output and epilogue), runnable with any :class:`Tiles`."""

    x: torch.Tensor
    w: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor
    out: torch.Tensor
    stride: int
    pad: int
    relu: bool
    out_scale: float
    out_q: bool
    fp8: bool
    pool: int
    ratio: float
    ho: int
    wo: int

    def key(self) -> tuple:
        return (tuple(self.x.shape), tuple(self.w.shape), self.stride, self.pad, self.pool, self.out_q, self.fp8,
                self.ratio != 1.0, self.out.dtype, self.x.device.index)  # fmt: skip

    def flat(self) -> bool:
        """A 1×1, stride-1, unpadded convolution without a pool is a GEMM over the pixels: one row of ``bm``."""
        return self.w.shape[1] == self.w.shape[2] == 1 and self.pad == 0 and self.stride == 1 and self.pool == 1

    def run(self, t: Tiles) -> None:
        x, w, p = self.x, self.w, self.pool
        n, h, wd, c = x.shape
        co, kh, kw, _ = w.shape
        if t.bm % (p * p):
            raise ValueError(f"conv2d_int8: a {p}x{p} pool needs a tile height divisible by {p * p}, got {t}")
        common = dict(RELU=self.relu, OUT_Q=self.out_q, FP8=self.fp8, POOL=p, REQUANT=self.ratio != 1.0,
                      BN=t.bn, BK=t.bk, GROUP_M=t.group, num_warps=t.warps, num_stages=t.stages)  # fmt: skip
        if t.tma:
            why = tma_unsupported(c=c, taps=kh * kw, stride=self.stride, device=x.device)
            bh, bw = (1, t.bm) if self.flat() else (t.bh, t.bm // t.bh)
            if why or bh * bw != t.bm or bh % p or bw % p:
                raise ValueError(f"conv2d_int8: the TMA kernel cannot run {t} here ({why or 'tile shape'}); "
                                 "pass tiles=None for the default")  # fmt: skip
            if self.flat():
                x, n, h, wd, ho, wo = x.view(1, 1, n * h * wd, c), 1, 1, n * h * wd, 1, n * h * wd
            else:
                ho, wo = self.ho, self.wo
            tiles_h, tiles_w = triton.cdiv(ho, bh), triton.cdiv(wo, bw)
            num_m = n * tiles_h * tiles_w
            x_desc = TensorDescriptor.from_tensor(x, [1, bh, bw, t.bk])
            w_desc = TensorDescriptor.from_tensor(w.view(co, kh * kw * c), [t.bn, t.bk])
            grid = (num_m * triton.cdiv(co, t.bn),)
            _conv_tma_kernel[grid](x_desc, w_desc, self.scale, self.bias, self.out, h, wd, c, ho, wo, co, tiles_h,
                                   tiles_w, num_m, self.out_scale, self.ratio, KH=kh, KW=kw, PAD=self.pad, BH=bh,
                                   BW=bw, **common)  # fmt: skip
            return
        m = n * (self.ho // p) * (self.wo // p) * p * p
        grid = (triton.cdiv(m, t.bm) * triton.cdiv(co, t.bn), t.split)
        if t.split > 1:
            if p > 1 or self.fp8 or c < 16:
                raise ValueError(f"conv2d_int8: split-K runs INT8 without a fused pool on C >= 16, not {t}")
            acc = torch.zeros((m, co), dtype=torch.int32, device=x.device)
            _conv_q8_kernel[grid](x, w, self.scale, self.bias, acc, m, h, wd, c, self.ho, self.wo, co, self.stride,
                                  self.pad, self.out_scale, self.ratio, KH=kh, KW=kw, GATHER=False,
                                  EVEN_C=c % t.bk == 0, BM=t.bm, SPLIT=t.split, **common)  # fmt: skip
            _split_epilogue_kernel[(triton.cdiv(m, 64), triton.cdiv(co, 64))](
                acc, self.scale, self.bias, self.out, m, co, self.out_scale, RELU=self.relu, OUT_Q=self.out_q, BM=64,
                BN=64)  # fmt: skip
            return
        _conv_q8_kernel[grid](x, w, self.scale, self.bias, self.out, m, h, wd, c, self.ho, self.wo, co, self.stride,
                              self.pad, self.out_scale, self.ratio, KH=kh, KW=kw, GATHER=c < 16,
                              EVEN_C=c % t.bk == 0, BM=t.bm, **common)  # fmt: skip


_TUNED: dict[tuple, Tiles] = {}  # the measured fastest configuration per launch (see :func:`_tune`)
_TIMINGS: dict[tuple, list[tuple[Tiles, float]]] = {}  # what tuning measured: (configuration, ms) per launch
_LAST: list = [None]  # (launch key, configuration) of the latest convolution launch


def tma_unsupported(*, c: int, taps: int, stride: int, device: torch.device) -> str:
    """Why the TMA kernel cannot run this convolution here ('' when it can)."""
    if TensorDescriptor is None:
        return "this Triton has no tensor descriptors"
    if stride != 1:
        return f"stride {stride} (the TMA kernel is stride 1)"
    if c % 16:
        return f"{c} input channels (TMA rows must be multiples of 16 bytes)"
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return "a GPU before Hopper (sm_90) has no TMA"
    if device.type != "cuda" and not interpreting():
        return "not a CUDA device"
    return ""


def candidate_tiles(*, n: int, ho: int, wo: int, c: int, co: int, taps: int, stride: int, pool: int,
                    device: torch.device) -> list[Tiles]:  # fmt: skip
    """The configurations :func:`_tune` times for one convolution: the pointer kernel's default, and TMA tiles
    of the three spatial shapes that waste the fewest rows at this image size (rows past the image's edge are
    computed and dropped; at most 40%) and of the best one-row shape."""
    m = n * ho * wo
    base = default_tiles(m=m, c=c, co=co, taps=taps)
    out = [base]
    steps = taps * triton.cdiv(c, base.bk)
    if pool == 1 and c >= 16 and triton.cdiv(m, base.bm) * triton.cdiv(co, base.bn) < 132 and steps >= 16:
        # too few output tiles to fill a 132-SM GPU (batch 1): split the reduction, >= 8 steps per part
        out += [replace(base, split=k) for k in (2, 4, 8) if steps // k >= 8]
    if tma_unsupported(c=c, taps=taps, stride=stride, device=device):
        return out
    bk = min(128, triton.next_power_of_2(c))
    bns = sorted({min(b, max(32, triton.next_power_of_2(co))) for b in (64, 128, 256)})
    if taps == 1 and pool == 1:
        shapes = [(1, 128)]
        bks = sorted({min(bk, 64), bk})
    else:
        shapes = []
        for bm in (64, 128):
            for bh in (1, 2, 4, 8, 16, 32):
                bw = bm // bh
                if bh % pool or bw % pool or bw < 8:
                    continue
                used = (ho * wo) / (triton.cdiv(ho, bh) * bh * triton.cdiv(wo, bw) * bw)
                if used >= 0.6:
                    shapes.append((used, bm, bh))
        ranked = sorted(shapes, reverse=True)
        # the three least wasteful, and the best one-row block (its A box needs no reshape: read by the MMA from
        # shared memory, where a multi-row box goes through registers)
        picked = ranked[:3] + [r for r in ranked[3:] if r[2] == 1][:1]
        shapes = [(bh, bm) for _, bm, bh in picked]
        bks = [bk]
    for bh, bm in shapes:
        for bn in bns:
            if bn == 256 and bm == 64:
                continue
            for k in bks:
                out.append(Tiles(bm, bn, k, 8 if bm * bn >= 128 * 256 else 4, 3 if k >= 128 else 4, tma=True, bh=bh))
    return out


def _tune(problem: _Problem, *, reps: int = 5) -> Tiles:
    """Time each of :func:`candidate_tiles` on this launch (after a compile-and-warm-up call) and return the
    fastest. Every candidate computes the same integers, so the choice changes speed, never the output."""
    x, w = problem.x, problem.w
    n, _, _, c = x.shape
    co, kh, kw, _ = w.shape
    cands = candidate_tiles(n=n, ho=problem.ho, wo=problem.wo, c=c, co=co, taps=kh * kw, stride=problem.stride,
                            pool=problem.pool, device=x.device)  # fmt: skip
    best, best_ms = cands[0], float("inf")
    timings = _TIMINGS[problem.key()] = []
    for t in cands:
        try:
            problem.run(t)
        except Exception:  # a configuration this GPU or Triton cannot compile (shared memory): not a candidate
            if t is cands[0]:
                raise
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            problem.run(t)
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) / reps
        timings.append((t, ms))
        if ms < best_ms:
            best, best_ms = t, ms
    return best


def last_launch() -> tuple[Tiles | None, list[tuple[Tiles, float]]]:
    """The configuration of the latest :func:`conv2d_int8`/:func:`conv2d_fp8` launch, and what tuning measured for
    that launch ((configuration, ms) per candidate; empty when it was not tuned): for per-layer reports."""
    if _LAST[0] is None:
        return None, []
    key, t = _LAST[0]
    return t, list(_TIMINGS.get(key, []))


def stem_window_weights(w: torch.Tensor, *, pool: int, packed: bool) -> torch.Tensor:
    """The stem weight as :func:`stem_int8`'s kernel reads it: for each of the pool² conv positions under a pooled
    pixel, ``w`` (CO, KH, KW, C ≤ 4) placed at that position's offset in the (KH + pool - 1)² input window, zeros
    elsewhere, flattened in the window's load order ((row, column, channel) for the packed NHWC4 input, (channel,
    row, column) for the float NCHW one, channels padded to 4). Returns int8 (pool², CO, 4·window pixels)."""
    co, kh, kw, c = w.shape
    win = torch.zeros((pool * pool, co, kh + pool - 1, kw + pool - 1, 4), dtype=torch.int8, device=w.device)
    for dy in range(pool):
        for dx in range(pool):
            win[dy * pool + dx, :, dy : dy + kh, dx : dx + kw, :c] = w
    if not packed:
        win = win.permute(0, 1, 4, 2, 3)
    return win.reshape(pool * pool, co, -1).contiguous()


def stem_int8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, *, in_scale: float,
              pad: int, conv_scale: float, pool: int, pool_scale: float, packed: bool = True,
              window: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The first layer fused: ``QuantizeLinear`` of the float NCHW images (``in_scale``), a stride-1 INT8 conv with
    few input channels + bias + ReLU + requantisation to ``conv_scale``, and a ``pool``×``pool`` stride-``pool`` max
    pool requantised to ``pool_scale``: the same arithmetic as :func:`quantize`, :func:`conv2d_int8` and
    :func:`maxpool2d_int8` in a row, without the full-size conv output in memory.

    Each pooled pixel's input window is read once and multiplied on the tensor cores with the weight at each pool
    position (:func:`stem_window_weights`). ``packed`` (default) first quantises the images into int8 NHWC with 4
    channels (one 4-byte word per pixel: coalesced window rows); otherwise the kernel quantises the float NCHW
    images as it loads them. Both give the same result.

    Args:
        x: float (N, C ≤ 4, H, W) images, contiguous; w: int8 (CO, KH, KW, C); scale, bias: float32 (CO,), scale > 0.
        window: ``stem_window_weights(w, pool=pool, packed=packed)``, if the caller keeps it (computed otherwise).

    Returns:
        int8 (N, H // pool, W // pool, CO) NHWC.
    """
    n, c, h, wd = x.shape
    co, kh, kw, c2 = w.shape
    if c != c2 or c > 4 or not x.is_contiguous() or not w.is_contiguous() or w.dtype != torch.int8 or h % pool \
            or wd % pool:  # fmt: skip
        raise ValueError(f"stem_int8: x float (N, C <= 4, H, W) contiguous with H, W divisible by {pool} and w int8 "
                         f"(CO, KH, KW, C); got {x.dtype} {tuple(x.shape)} and {w.dtype} {tuple(w.shape)}")  # fmt: skip
    if not available(x.device):
        y = conv2d_int8(quantize(x.permute(0, 2, 3, 1), in_scale).contiguous(), w, scale, bias, stride=1, pad=pad,
                        relu=True, out_scale=conv_scale)  # fmt: skip
        return maxpool2d_int8(y, kernel=pool, stride=pool, pad=0, in_scale=conv_scale, out_scale=pool_scale)
    if window is None:
        window = stem_window_weights(w, pool=pool, packed=packed)
    src = x
    if packed:
        src = torch.empty((n, h, wd, 4), dtype=torch.int8, device=x.device)
        block = 1024
        _quantize_nhwc4_kernel[(triton.cdiv(n * h * wd, block),)](x, src.view(torch.int32), n * h * wd, h * wd,
                                                                  float(in_scale), C=c, BLOCK=block)  # fmt: skip
    ph, pw = h // pool, wd // pool
    out = torch.empty((n, ph, pw, co), dtype=torch.int8, device=x.device)
    m = n * ph * pw
    bm, bn = (32, 32) if interpreting() else (128, min(128, max(32, triton.next_power_of_2(co))))
    grid = (triton.cdiv(m, bm), triton.cdiv(co, bn))
    wh, ww = kh + pool - 1, kw + pool - 1
    _stem_int8_kernel[grid](src, window, scale, bias, out, m, h, wd, ph, pw, co, float(in_scale), float(conv_scale),
                            float(conv_scale / pool_scale), C=c, WH=wh, WW=ww, PAD=pad, POOL=pool, PACKED=packed,
                            REQUANT=conv_scale != pool_scale, BM=bm, BN=bn,
                            BK=max(32, triton.next_power_of_2(4 * wh * ww)), num_warps=4, num_stages=1)  # fmt: skip
    return out


def maxpool2d_int8(x: torch.Tensor, *, kernel: int, stride: int, pad: int, in_scale: float,
                   out_scale: float) -> torch.Tensor:  # fmt: skip
    """Max pooling of int8 NHWC ``x`` (padding never wins: it is -128), requantised from ``in_scale`` to
    ``out_scale`` when they differ. Returns int8 (N, HO, WO, C)."""
    n, h, w, c = x.shape
    ho = conv_output_size(h, kernel=kernel, stride=stride, pad=pad)
    wo = conv_output_size(w, kernel=kernel, stride=stride, pad=pad)
    requant = in_scale != out_scale
    if not available(x.device):
        y = F.max_pool2d(x.permute(0, 3, 1, 2).float(), kernel, stride, pad).permute(0, 2, 3, 1)
        if requant:
            y = torch.round((y * (in_scale / out_scale)).clamp(-128, 127))
        return y.to(torch.int8).contiguous()
    out = torch.empty((n, ho, wo, c), dtype=torch.int8, device=x.device)
    total = out.numel()
    block = 1024
    _maxpool_int8_kernel[(triton.cdiv(total, block),)](x, out, total, h, w, c, ho, wo, stride, pad,
                                                       float(in_scale / out_scale), K=kernel, REQUANT=requant,
                                                       BLOCK=block)  # fmt: skip
    return out


def maxpool2d_fp8(x: torch.Tensor, *, kernel: int, stride: int, pad: int, in_scale: float,
                  out_scale: float) -> torch.Tensor:  # fmt: skip
    """:func:`maxpool2d_int8` on e4m3 NHWC ``x`` (CUDA): the maximum, requantised from ``in_scale`` to
    ``out_scale`` (``clamp(v · in_scale / out_scale, ±448)`` rounded to e4m3). Returns e4m3 (N, HO, WO, C)."""
    if x.dtype != torch.float8_e4m3fn or x.device.type != "cuda" or triton is None:
        raise ValueError(f"maxpool2d_fp8: an e4m3 CUDA tensor, got {x.dtype} on {x.device}")
    n, h, w, c = x.shape
    ho = conv_output_size(h, kernel=kernel, stride=stride, pad=pad)
    wo = conv_output_size(w, kernel=kernel, stride=stride, pad=pad)
    out = torch.empty((n, ho, wo, c), dtype=torch.float8_e4m3fn, device=x.device)
    total, block = out.numel(), 1024
    _maxpool_fp8_kernel[(triton.cdiv(total, block),)](x, out, total, h, w, c, ho, wo, stride, pad,
                                                      float(in_scale / out_scale), K=kernel, BLOCK=block)  # fmt: skip
    return out


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """e4m3 quantisation: ``clamp(x / scale, ±448)`` rounded to e4m3 (round to nearest even)."""
    return (x.float() / scale).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)


def quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``QuantizeLinear`` (zero point 0): ``clamp(round_half_even(x / scale), -128, 127)`` as int8."""
    return torch.round(x.float() / scale).clamp_(-128, 127).to(torch.int8)


def reference_conv2d_int8(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    *,
    stride: int,
    pad: int,
    relu: bool,
    out_scale: float | None,
    out_dtype: torch.dtype = torch.float16,
    accumulators: bool = False,
) -> torch.Tensor:
    """:func:`conv2d_int8` in plain PyTorch: exact INT32 accumulators (float64 convolution of the int8 values), the
    same float32 epilogue. ``accumulators=True`` returns the int32 (N, HO, WO, CO) sums instead."""
    xn = x.permute(0, 3, 1, 2).double()
    wn = w.permute(0, 3, 1, 2).double()  # (CO, KH, KW, C) -> (CO, C, KH, KW)
    acc = F.conv2d(xn, wn, stride=stride, padding=pad).permute(0, 2, 3, 1).to(torch.int32)
    if accumulators:
        return acc
    y = acc.float() * scale.float() + bias.float()
    if relu:
        y = y.clamp_min(0.0)
    if out_scale is None:
        return y.to(out_dtype).contiguous()
    q = (y / torch.tensor(out_scale, dtype=torch.float32)).clamp(-128.0, 127.0)
    return torch.round(q).to(torch.int8).contiguous()
