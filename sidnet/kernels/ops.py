"""PyTorch wrappers around the kernels library's launchers (CUDA tensors in, outputs allocated on the same device,
launched on the current stream); see :mod:`sidnet.kernels` for the list. torch is imported on first use."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from sidnet.kernels.library import (
    REGION_TOPK_MAX_K,
    _check,
    _dtype_code,
    _late_symbol,
    _lib,
    _on_device,
    _out_tensor,
    _stream,
)

if TYPE_CHECKING:
    import torch


def reorg(x: torch.Tensor, stride: int = 2, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Space-to-depth, ONNX order: (N, C, H, W) → (N, C·s², H/s, W/s), same dtype (float32 or float16).

    ``out[n, (by*s + bx)*C + c, h, w] = x[n, c, h*s + by, w*s + bx]``; ``out`` may be preallocated.
    """

    code = _dtype_code(x, "reorg: x")
    if x.dim() != 4:
        raise ValueError(f"reorg: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if stride < 1 or h % stride or w % stride:
        raise ValueError(f"reorg: spatial size {h}x{w} is not a multiple of stride {stride}")
    x = x.contiguous()
    shape = (n, c * stride * stride, h // stride, w // stride)
    out = _out_tensor(out, shape, x.dtype, x, "reorg: out")
    lib = _lib()
    with _on_device(x):
        err = lib.reorgForward(x.data_ptr(), out.data_ptr(), code, n, c, h, w, stride, _stream(x))
    _check(lib, err, "reorgForward")
    return out


def _region_args(raw: torch.Tensor, anchors: torch.Tensor, what: str):
    code = _dtype_code(raw, f"{what}: raw")
    if raw.dim() != 4 or anchors.dim() != 2 or anchors.shape[1] != 2:
        raise ValueError(
            f"{what}: raw must be (N, A*(5+C), H, W) and anchors (A, 2), got {tuple(raw.shape)} and "
            f"{tuple(anchors.shape)}"
        )
    import torch

    n, ch, h, w = raw.shape
    a = anchors.shape[0]
    if a == 0 or ch % a or ch // a < 6:
        raise ValueError(f"{what}: {ch} channels is not A*(5+C) with A={a} anchors and C >= 1 classes")
    anchors = anchors.to(device=raw.device, dtype=torch.float32).contiguous()
    return code, raw.contiguous(), anchors, (n, a, ch // a - 5, h, w)


def region_decode(
    raw: torch.Tensor, anchors: torch.Tensor, *, stride: tuple[float, float], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense decode: (N, A·(5+C), H, W) fp32/fp16 → (N, A·H·W, 5+C) float32 rows ``[cx, cy, w, h, obj, p_0…]``.

    ``anchors`` (A, 2) (w, h) in input pixels; ``stride`` (sx, sy) = input size / grid size.
    """
    import torch

    code, raw, anchors, (n, a, c, h, w) = _region_args(raw, anchors, "region_decode")
    shape = (n, a * h * w, 5 + c)
    out = _out_tensor(out, shape, torch.float32, raw, "region_decode: out")
    lib = _lib()
    with _on_device(raw):
        err = lib.regionDecode(
            raw.data_ptr(), code, anchors.data_ptr(), n, a, c, h, w, float(stride[0]), float(stride[1]),
            out.data_ptr(), _stream(raw),
        )  # fmt: skip
    _check(lib, err, "regionDecode")
    return out


def region_topk(
    raw: torch.Tensor,
    anchors: torch.Tensor,
    *,
    stride: tuple[float, float],
    conf_thresh: float,
    topk: int,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused decode + ``score >= conf_thresh`` + top-K, one kernel.

    Returns ``dets`` float32 (N, topk, 6) rows ``[x1, y1, x2, y2, score, class]`` by score descending (ties: lower
    flat index m = a·H·W + y·W + x first), zero rows after the valid ones, and ``num`` int32 (N,). Needs
    ``min(topk, A·H·W) <= REGION_TOPK_MAX_K``. ``out`` may hold preallocated (dets, num).
    """
    import torch

    code, raw, anchors, (n, a, c, h, w) = _region_args(raw, anchors, "region_topk")
    if topk < 0 or min(topk, a * h * w) > REGION_TOPK_MAX_K:
        raise ValueError(f"region_topk: topk={topk} must be >= 0 and min(topk, A*H*W) <= {REGION_TOPK_MAX_K}")
    dets, num = out if out is not None else (None, None)
    dets = _out_tensor(dets, (n, topk, 6), torch.float32, raw, "region_topk: dets")
    num = _out_tensor(num, (n,), torch.int32, raw, "region_topk: num")
    lib = _lib()
    ws_bytes = lib.regionTopKWorkspaceSize(n, a, h, w, topk)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=raw.device) if ws_bytes else None
    with _on_device(raw):
        err = lib.regionTopK(
            raw.data_ptr(), code, anchors.data_ptr(), n, a, c, h, w, float(stride[0]), float(stride[1]),
            float(conf_thresh), topk, dets.data_ptr(), num.data_ptr(), ws.data_ptr() if ws is not None else None,
            ws_bytes, _stream(raw),
        )  # fmt: skip
    _check(lib, err, "regionTopK")
    return dets, num


def pyramid_roi_align(
    features: list[torch.Tensor],
    rois: torch.Tensor,
    *,
    output_size: tuple[int, int],
    sampling_ratio: int,
    scales: list[float],
    canonical_level: float = 4.0,
    canonical_size: float = 224.0,
) -> torch.Tensor:
    """Multi-level RoIAlign (torchvision ``MultiScaleRoIAlign``, ``aligned=False``) in one kernel.

    ``features``: L maps (N, C, H_l, W_l), one dtype (float32 or float16), finest first; ``rois``: (N, R, 4) xyxy input
    pixels (float32 or castable); ``scales``: 1/stride of each level, e.g. [1/8, 1/16, 1/32]. Returns
    (N, R, C, PH, PW) in the features' dtype.
    """
    import math

    import torch

    if not features or len(features) != len(scales):
        raise ValueError(f"pyramid_roi_align: {len(features)} feature maps for {len(scales)} scales")
    code = _dtype_code(features[0], "pyramid_roi_align: features[0]")
    n, c = features[0].shape[:2]
    for i, f in enumerate(features):
        if f.dim() != 4 or f.shape[:2] != (n, c) or f.dtype != features[0].dtype or f.device != features[0].device:
            raise ValueError(f"pyramid_roi_align: features[{i}] {tuple(f.shape)} {f.dtype} does not match features[0]")
    if rois.dim() != 3 or rois.shape[0] != n or rois.shape[2] != 4:
        raise ValueError(f"pyramid_roi_align: rois must be (N={n}, R, 4), got {tuple(rois.shape)}")
    ph, pw = output_size
    features = [f.contiguous() for f in features]
    rois = rois.to(device=features[0].device, dtype=torch.float32).contiguous()
    r = rois.shape[1]
    out = torch.empty((n, r, c, ph, pw), dtype=features[0].dtype, device=features[0].device)
    levels = len(features)
    ptrs = (ctypes.c_void_p * levels)(*[f.data_ptr() for f in features])
    hs = (ctypes.c_int * levels)(*[f.shape[2] for f in features])
    ws = (ctypes.c_int * levels)(*[f.shape[3] for f in features])
    sc = (ctypes.c_float * levels)(*[float(v) for v in scales])
    min_level = round(-math.log2(scales[0]))
    lib = _lib()
    with _on_device(rois):
        err = lib.pyramidRoiAlign(
            ptrs, levels, hs, ws, sc, code, n, c, rois.data_ptr(), r, ph, pw, sampling_ratio, min_level,
            float(canonical_level), float(canonical_size), out.data_ptr(), _stream(rois),
        )  # fmt: skip
    _check(lib, err, "pyramidRoiAlign")
    return out


def _nhwc_out(out: torch.Tensor | None, shape: tuple, x: torch.Tensor, name: str) -> torch.Tensor:
    """``out`` checked (channels-last, x's dtype and device, ``shape``), or a new such tensor."""
    import torch

    if out is None:
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    if (tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device
            or not out.is_contiguous(memory_format=torch.channels_last)):  # fmt: skip
        raise ValueError(f"{name}: out must be a channels-last {x.dtype} tensor of shape {shape} on {x.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")  # fmt: skip
    return out


def maxpool2x2_nhwc(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``nn.MaxPool2d(2, 2)`` of a channels-last (N, C, H, W) float16/float32 CUDA tensor, output channels-last.

    Equal to ``F.max_pool2d(x, 2, 2)`` for NaN-free input (see ``csrc/maxpool/maxpoolKernel.h``).
    """
    import torch

    code = _dtype_code(x, "maxpool2x2_nhwc: x")
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"maxpool2x2_nhwc: x must be a channels-last (N, C, H, W) tensor, got {tuple(x.shape)} "
                         f"strides {x.stride()}")  # fmt: skip
    n, c, h, w = x.shape
    out = _nhwc_out(out, (n, c, h // 2, w // 2), x, "maxpool2x2_nhwc")
    lib = _lib()
    vp, i = ctypes.c_void_p, ctypes.c_int
    fn = _late_symbol(lib, "maxPool2x2Nhwc", [vp, vp, i, i, i, i, i, vp])
    with _on_device(x):
        err = fn(x.data_ptr(), out.data_ptr(), code, n, h, w, c, _stream(x))
    _check(lib, err, "maxPool2x2Nhwc")
    return out


STEM_ACTS = {"identity": 0, "relu": 1, "leaky_relu": 2}


def stem_conv_act_pool(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    act: str = "relu",
    slope: float = 0.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``max_pool2d(act(conv2d(x, weight, bias, padding=1)), 2, 2)`` in one kernel (``csrc/stem``).

    x: channels-last (N, 3, H, W) float16/float32 CUDA tensor; weight: (K, 3, 3, 3) with K a multiple of 8 and bias (K,)
    on any device (copied to the host: they travel in the launch's parameter block, fp32); act: ``identity``, ``relu``
    or ``leaky_relu`` (``slope``). Returns channels-last (N, K, H/2, W/2) in x's dtype. fp32 accumulation.
    """
    import torch

    code = _dtype_code(x, "stem_conv_act_pool: x")
    if x.dim() != 4 or x.shape[1] != 3 or not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"stem_conv_act_pool: x must be a channels-last (N, 3, H, W) tensor, got {tuple(x.shape)} "
                         f"strides {x.stride()}")  # fmt: skip
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (3, 3, 3) or weight.shape[0] % 8:
        raise ValueError(f"stem_conv_act_pool: weight must be (K, 3, 3, 3) with K a multiple of 8, got "
                         f"{tuple(weight.shape)}")  # fmt: skip
    if act not in STEM_ACTS:
        raise ValueError(f"stem_conv_act_pool: act {act!r}: use one of {sorted(STEM_ACTS)}")
    k = weight.shape[0]
    host_w = weight.detach().float().permute(0, 2, 3, 1).contiguous().cpu()  # (k, ky, kx, c)
    host_b = None if bias is None else bias.detach().float().contiguous().cpu()
    n, _, h, w = x.shape
    out = _nhwc_out(out, (n, k, h // 2, w // 2), x, "stem_conv_act_pool")
    lib = _lib()
    vp, i = ctypes.c_void_p, ctypes.c_int
    fn = _late_symbol(lib, "stemConvActPool", [vp, vp, i, i, i, i, i, vp, vp, i, ctypes.c_float, vp])
    with _on_device(x):
        err = fn(x.data_ptr(), out.data_ptr(), code, n, h, w, k, host_w.data_ptr(),
                 None if host_b is None else host_b.data_ptr(), STEM_ACTS[act], float(slope), _stream(x))  # fmt: skip
    _check(lib, err, "stemConvActPool")
    return out
