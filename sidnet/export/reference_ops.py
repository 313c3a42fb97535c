"""NumPy reference implementations of the ``sidnet`` custom ops, as ``onnx.reference`` operators.

They let the **plugins**-target ONNX run on any machine (``ReferenceEvaluator(model, new_ops=REFERENCE_OPS)``), which
proves the rewrite into plugin nodes preserves the numbers of the PyTorch model. Semantics, shared with the CUDA
kernels in ``csrc/`` and the PyTorch reference in :mod:`sidnet.models`:

- ``sidnet::Reorg(x)``: (N, C, H, W) → (N, C·s², H/s, W/s), ``out[n, (by·s + bx)·C + c, h, w] =
  x[n, c, h·s + by, w·s + bx]`` (ONNX SpaceToDepth order), same dtype. Attribute ``stride``.
- ``sidnet::RegionDecode(raw)``: (N, A·(5+C), H, W) fp32/fp16 → ``detections`` float32 (N, topk, 6) rows
  ``[x1, y1, x2, y2, score, class]`` by score descending (ties: lower flat index ``a·H·W + y·W + x`` first), zero rows
  after the valid ones, and ``num_detections`` int32 (N,). Attributes ``anchors`` (flat w, h pairs in input pixels),
  ``num_anchors``, ``num_classes``, ``stride_x``, ``stride_y``, ``conf_thresh``, ``topk``.
- ``sidnet::PyramidRoIAlign(features..., rois)``: L maps (N, C, H_l, W_l) finest first and rois (N, R, 4) xyxy input
  pixels → (N, R, C, P, P), torchvision ``MultiScaleRoIAlign`` (``aligned=False``): each RoI pooled from the level
  ``clamp(floor(canonical_level + log2(sqrt(area) / canonical_size) + 1e-6), min_level, min_level + L - 1)``, the
  mean of ``sampling_ratio``² bilinear samples per bin (torchvision's ``bilinear_interpolate``). Attributes
  ``output_size``, ``sampling_ratio``, ``scales`` (1/stride per level), ``min_level``, ``canonical_level``,
  ``canonical_size``.
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

__all__ = ["REFERENCE_OPS", "PyramidRoIAlign", "RegionDecode", "Reorg", "pyramid_roi_align_numpy", "region_topk_numpy",
           "reorg_numpy"]  # fmt: skip


def reorg_numpy(x: np.ndarray, stride: int) -> np.ndarray:
    n, c, h, w = x.shape
    if h % stride or w % stride:
        raise ValueError(f"Reorg: spatial size {h}x{w} is not a multiple of stride {stride}")
    y = x.reshape(n, c, h // stride, stride, w // stride, stride).transpose(0, 3, 5, 1, 2, 4)
    return np.ascontiguousarray(y.reshape(n, c * stride * stride, h // stride, w // stride))


def _sigmoid(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-v) → inf for very negative v gives the right limit, 0
        return (1.0 / (1.0 + np.exp(-v))).astype(np.float32)


def region_topk_numpy(
    raw: np.ndarray, anchors: np.ndarray, *, stride: tuple[float, float], conf_thresh: float, topk: int
) -> tuple[np.ndarray, np.ndarray]:
    """The NumPy twin of :func:`sidnet.models.region.region_topk`, computed in float32."""
    n, ch, h, w = raw.shape
    a = anchors.shape[0]
    p = raw.astype(np.float32).reshape(n, a, ch // a, h, w).transpose(0, 1, 3, 4, 2)  # (N, A, H, W, 5+C)
    xs = np.arange(w, dtype=np.float32).reshape(1, 1, 1, w)
    ys = np.arange(h, dtype=np.float32).reshape(1, 1, h, 1)
    cx = (_sigmoid(p[..., 0]) + xs) * np.float32(stride[0])
    cy = (_sigmoid(p[..., 1]) + ys) * np.float32(stride[1])
    with np.errstate(over="ignore"):
        bw = np.exp(p[..., 2]) * anchors[:, 0].astype(np.float32).reshape(1, a, 1, 1)
        bh = np.exp(p[..., 3]) * anchors[:, 1].astype(np.float32).reshape(1, a, 1, 1)
    logits = p[..., 5:]
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    prob = e / e.sum(axis=-1, keepdims=True)
    score = (_sigmoid(p[..., 4]) * prob.max(axis=-1)).reshape(n, -1)
    cls = prob.argmax(axis=-1).reshape(n, -1).astype(np.float32)
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=-1).reshape(n, -1, 4)
    dets = np.zeros((n, topk, 6), dtype=np.float32)
    num = np.zeros((n,), dtype=np.int32)
    for i in range(n):
        keep = np.nonzero(score[i] >= np.float32(conf_thresh))[0]
        idx = keep[np.argsort(-score[i, keep], kind="stable")][:topk]  # stable: equal scores keep ascending index
        k = idx.size
        dets[i, :k, :4] = boxes[i, idx]
        dets[i, :k, 4] = score[i, idx]
        dets[i, :k, 5] = cls[i, idx]
        num[i] = k
    return dets, num


class Reorg(OpRun):
    op_domain = "sidnet"

    def _run(self, x, stride=2, version=None, plugin_namespace=None, plugin_version=None):  # noqa: ARG002
        return (reorg_numpy(x, int(stride)),)


class RegionDecode(OpRun):
    op_domain = "sidnet"

    def _run(
        self,
        raw,
        anchors=None,
        num_anchors=None,
        num_classes=None,
        stride_x=None,
        stride_y=None,
        conf_thresh=None,
        topk=None,
        version=None,
        plugin_namespace=None,
        plugin_version=None,
    ):  # noqa: ARG002
        anchors = np.asarray(anchors, dtype=np.float32).reshape(-1, 2)
        if anchors.shape[0] != num_anchors or raw.shape[1] != num_anchors * (5 + num_classes):
            raise ValueError(
                f"RegionDecode: raw has {raw.shape[1]} channels, expected num_anchors * (5 + num_classes)"
                f" = {num_anchors} * (5 + {num_classes}) with {anchors.shape[0]} anchors"
            )
        return region_topk_numpy(raw, anchors, stride=(stride_x, stride_y), conf_thresh=conf_thresh, topk=int(topk))


def _bilinear(plane: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """torchvision's ``bilinear_interpolate`` at sample points ``y``, ``x`` (same shape) of one (C, H, W) map →
    (C, *y.shape)."""
    _, h, w = plane.shape
    out_of_map = (y < -1.0) | (y > h) | (x < -1.0) | (x > w)
    y, x = np.maximum(y, 0.0), np.maximum(x, 0.0)
    yl, xl = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    y = np.where(yl >= h - 1, h - 1, y)
    x = np.where(xl >= w - 1, w - 1, x)
    yl, xl = np.minimum(yl, h - 1), np.minimum(xl, w - 1)
    yh, xh = np.minimum(yl + 1, h - 1), np.minimum(xl + 1, w - 1)
    ly, lx = (y - yl).astype(np.float32), (x - xl).astype(np.float32)
    hy, hx = 1.0 - ly, 1.0 - lx
    v = hy * hx * plane[:, yl, xl] + hy * lx * plane[:, yl, xh]
    v = v + ly * hx * plane[:, yh, xl] + ly * lx * plane[:, yh, xh]
    return np.where(out_of_map, np.float32(0.0), v)


def pyramid_roi_align_numpy(features: list[np.ndarray], rois: np.ndarray, *, output_size: int, sampling_ratio: int,
                            scales: list[float], min_level: int, canonical_level: float = 4.0,
                            canonical_size: float = 224.0) -> np.ndarray:  # fmt: skip
    """The NumPy twin of torchvision's ``MultiScaleRoIAlign`` on (N, R, 4) RoIs, computed in float32."""
    n, r = rois.shape[:2]
    c = features[0].shape[1]
    p, sr = int(output_size), int(sampling_ratio)
    boxes = rois.astype(np.float32)
    size = np.sqrt((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))
    with np.errstate(divide="ignore"):
        lvl = np.floor(np.float32(canonical_level) + np.log2(size / np.float32(canonical_size)) + np.float32(1e-6))
    lvl = (np.clip(lvl, min_level, min_level + len(features) - 1) - min_level).astype(np.int64)
    out = np.zeros((n, r, c, p, p), dtype=np.float32)
    steps = (np.arange(p * sr, dtype=np.float32) + 0.5) / sr  # sample positions in bins
    for i in range(n):
        for j in range(r):
            level = lvl[i, j]
            scale = np.float32(scales[level])
            x0, y0, x1, y1 = boxes[i, j] * scale
            bw, bh = max(x1 - x0, 1.0) / p, max(y1 - y0, 1.0) / p
            ys, xs = np.meshgrid(y0 + steps * bh, x0 + steps * bw, indexing="ij")
            samples = _bilinear(features[level][i].astype(np.float32), ys, xs)  # (C, P·sr, P·sr)
            out[i, j] = samples.reshape(c, p, sr, p, sr).mean(axis=(2, 4))
    return out


class PyramidRoIAlign(OpRun):
    op_domain = "sidnet"

    def _run(self, *inputs, output_size=None, sampling_ratio=None, scales=None, min_level=None, canonical_level=None,
             canonical_size=None, version=None, plugin_namespace=None, plugin_version=None):  # noqa: ARG002  # fmt: skip
        *features, rois = inputs
        if len(features) != len(scales):
            raise ValueError(f"PyramidRoIAlign: {len(features)} feature maps for {len(scales)} scales")
        out = pyramid_roi_align_numpy(list(features), rois, output_size=output_size, sampling_ratio=sampling_ratio,
                                      scales=list(scales), min_level=int(min_level), canonical_level=canonical_level,
                                      canonical_size=canonical_size)  # fmt: skip
        return (out.astype(features[0].dtype),)


REFERENCE_OPS = [Reorg, RegionDecode, PyramidRoIAlign]
