"""The public launchers: convolution (INT8, FP8), the fused stem, max pooling, quantisation and the exact integer
reference the tests hold the kernels to."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .launch import Tiles, conv_output_size, launch_conv
from .triton_kernels import (
    _maxpool_fp8_kernel,
    _maxpool_int8_kernel,
    _quantize_nhwc4_kernel,
    _stem_int8_kernel,
    available,
    interpreting,
    triton,
)


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
    return launch_conv(x, w, scale, bias, stride=stride, pad=pad, relu=relu, out_scale=out_scale, out_dtype=out_dtype,
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
    quantised once, at ``out_scale`` (pass the pool's output scale). CUDA (sm_89+), or Triton's interpreter."""
    _check(x, w, torch.float8_e4m3fn, "conv2d_fp8")
    if triton is None or not (x.device.type == "cuda" or interpreting()):
        raise RuntimeError(f"conv2d_fp8 runs on a CUDA GPU with Triton, or in Triton's interpreter (got a "
                           f"{x.device.type} tensor)")  # fmt: skip
    if pool > 1 and out_scale is None:
        raise ValueError("conv2d_fp8: a fused max pool needs the e4m3 output (out_scale)")
    return launch_conv(x, w, scale, bias, stride=stride, pad=pad, relu=relu, out_scale=out_scale, out_dtype=out_dtype,
                   tiles=tiles, q_dtype=torch.float8_e4m3fn, tune=tune, pool=pool)  # fmt: skip


def _check(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    if x.dtype != dtype or w.dtype != dtype or x.shape[3] != w.shape[3] or not x.is_contiguous() \
            or not w.is_contiguous():  # fmt: skip
        raise ValueError(f"{name}: x {dtype} NHWC (N, H, W, C) and w {dtype} (CO, KH, KW, C), contiguous; got "
                         f"{x.dtype} {tuple(x.shape)} and {w.dtype} {tuple(w.shape)}")  # fmt: skip


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
