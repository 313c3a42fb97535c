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

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of PyTorch; on a CPU-only install it may be missing
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None

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
    def _conv_int8_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, H, W, C, HO, WO, CO, stride, pad,
                          out_scale, KH: tl.constexpr, KW: tl.constexpr, RELU: tl.constexpr, OUT_INT8: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        m_ok = rm < M
        n_ok = rn < CO
        img = rm // (HO * WO)
        rem = rm % (HO * WO)
        oh = rem // WO
        ow = rem % WO
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for r in tl.static_range(KH):
            for s in tl.static_range(KW):
                ih = oh * stride - pad + r
                iw = ow * stride - pad + s
                pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                base = ((img.to(tl.int64) * H + ih) * W + iw) * C
                for c0 in range(0, C, BK):
                    kc = c0 + rk
                    k_ok = kc < C
                    a = tl.load(x_ptr + base[:, None] + kc[None, :], mask=pix_ok[:, None] & k_ok[None, :], other=0)
                    b = tl.load(w_ptr + ((r * KW + s) * C + kc)[:, None] * CO + rn[None, :],
                                mask=k_ok[:, None] & n_ok[None, :], other=0)  # fmt: skip
                    acc += tl.dot(a, b)
        scale = tl.load(scale_ptr + rn, mask=n_ok, other=0.0)
        bias = tl.load(bias_ptr + rn, mask=n_ok, other=0.0)
        y = acc.to(tl.float32) * scale[None, :] + bias[None, :]
        if RELU:
            y = tl.maximum(y, 0.0)
        offs = rm.to(tl.int64)[:, None] * CO + rn[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        if OUT_INT8:
            q = tl.minimum(tl.maximum(y / out_scale, -128.0), 127.0)
            q = (q + 12582912.0) - 12582912.0
            tl.store(out_ptr + offs, q.to(tl.int8), mask=ok)
        else:
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=ok)

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


def _tiles(m: int, cin: int, cout: int) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, warps, stages) for a layer: Hopper-sized tiles on the GPU, small ones in the interpreter."""
    if interpreting():
        return 32, 32, 32, 4, 1
    bn = 128 if cout >= 128 else max(32, triton.next_power_of_2(cout))
    bk = 128 if cin >= 128 else max(32, triton.next_power_of_2(cin))
    bm = 128 if m >= 4096 else 64
    return bm, bn, bk, 8 if bm * bn >= 128 * 128 else 4, 3


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
) -> torch.Tensor:
    """INT8 convolution with the fused epilogue.

    Args:
        x: int8 (N, H, W, C), contiguous (NHWC).
        w: int8 (KH, KW, C, CO), contiguous (the GEMM's K × N operand).
        scale: float32 (CO,) = ``s_x · s_w[co]``; bias: float32 (CO,).
        out_scale: the next ``QuantizeLinear``'s scale (int8 output), or ``None`` for a float output.
        out_dtype: the float output's dtype when ``out_scale`` is ``None``.

    Returns:
        (N, HO, WO, CO) int8 or ``out_dtype``.
    """
    n, h, wd, c = x.shape
    kh, kw, c2, co = w.shape
    if x.dtype != torch.int8 or w.dtype != torch.int8 or c != c2 or not x.is_contiguous() or not w.is_contiguous():
        raise ValueError(f"conv2d_int8: x int8 NHWC (N, H, W, C) and w int8 (KH, KW, C, CO), contiguous; got "
                         f"{x.dtype} {tuple(x.shape)} and {w.dtype} {tuple(w.shape)}")  # fmt: skip
    ho = conv_output_size(h, kernel=kh, stride=stride, pad=pad)
    wo = conv_output_size(wd, kernel=kw, stride=stride, pad=pad)
    if not available(x.device):
        return reference_conv2d_int8(x, w, scale, bias, stride=stride, pad=pad, relu=relu, out_scale=out_scale,
                                     out_dtype=out_dtype)  # fmt: skip
    out = torch.empty((n, ho, wo, co), dtype=torch.int8 if out_scale is not None else out_dtype, device=x.device)
    m = n * ho * wo
    bm, bn, bk, warps, stages = _tiles(m, c, co)
    grid = (triton.cdiv(m, bm), triton.cdiv(co, bn))
    _conv_int8_kernel[grid](x, w, scale, bias, out, m, h, wd, c, ho, wo, co, stride, pad,
                            float(out_scale if out_scale is not None else 1.0), KH=kh, KW=kw, RELU=relu,
                            OUT_INT8=out_scale is not None, BM=bm, BN=bn, BK=bk, num_warps=warps,
                            num_stages=stages)  # fmt: skip
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
    wn = w.permute(3, 2, 0, 1).double()  # (CO, C, KH, KW)
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
