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
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

__all__ = ["REFERENCE_OPS", "RegionDecode", "Reorg", "region_topk_numpy", "reorg_numpy"]


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


REFERENCE_OPS = [Reorg, RegionDecode]
