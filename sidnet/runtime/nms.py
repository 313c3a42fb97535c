"""Top-K detections from any backend → final per-image detections in original-image pixels (NumPy, no torch).

Every backend returns the exported contract: ``dets`` float32 (N, K, 6) rows ``[x1, y1, x2, y2, score, class]`` in
letterboxed input pixels, score-descending, and ``num`` int (N,) valid rows. :func:`finalize` applies the caller's
threshold, class-wise greedy NMS (the semantics of ``torchvision.ops.batched_nms``: a box is dropped when its IoU
with a kept, higher-scoring box of the same class is > ``iou``) and maps boxes back through the letterbox.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sidnet.letterbox import LetterboxInfo


@dataclass
class Detections:
    """One image's detections in original pixels: ``boxes`` (P, 4) float32 xyxy, ``scores`` (P,), ``classes`` (P,)
    int64, score-descending."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def as_array(self) -> np.ndarray:
        """(P, 6) float32 ``[x1, y1, x2, y2, score, class]``, the layout ``predict_dataset`` returns."""
        return np.concatenate([self.boxes, self.scores[:, None], self.classes[:, None].astype(np.float32)], 1)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, *, iou: float) -> np.ndarray:
    """Indices kept by class-wise greedy NMS, score-descending (stable: equal scores keep input order)."""
    order = np.argsort(-scores, kind="stable")
    # Offsetting each class by more than the largest coordinate keeps classes apart (batched_nms's trick).
    offset = classes.astype(np.float32)[:, None] * (float(np.abs(boxes).max(initial=0.0)) + 1.0)
    b = boxes + offset
    area = (b[:, 2] - b[:, 0]).clip(min=0) * (b[:, 3] - b[:, 1]).clip(min=0)
    keep: list[int] = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = (np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0])).clip(min=0)
        h = (np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1])).clip(min=0)
        inter = w * h
        overlap = inter / np.maximum(area[i] + area[rest] - inter, 1e-12)
        order = rest[overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


def finalize(
    dets: np.ndarray,
    num: np.ndarray,
    infos: Sequence[LetterboxInfo],
    *,
    conf_thresh: float,
    nms_iou: float = 0.45,
    max_det: int = 100,
) -> list[Detections]:
    """(N, K, 6) + (N,) in input pixels → N :class:`Detections` in original pixels (threshold, NMS, unletterbox).

    Vectorised over the batch (the multi-stream pipeline calls it once per batch): the greedy NMS walks the columns
    of an (N, M, M) IoU tensor, M the most boxes any image keeps after the threshold, so its cost grows with M, not
    with N. Same arithmetic as :func:`nms` per image (float32 class offsets, ``inter / max(union, 1e-12) > iou``),
    hence the same boxes.
    """
    dets = np.asarray(dets, dtype=np.float32)
    n, k = dets.shape[:2]
    if n == 0:
        return []
    scores = dets[..., 4]
    valid = (np.arange(k)[None, :] < np.asarray(num).reshape(n, 1)) & (scores >= conf_thresh)
    order = np.argsort(np.where(valid, -scores, np.inf), axis=1, kind="stable")  # valid first, score-descending
    m = int(valid.sum(1).max())
    order = order[:, :m]
    d = np.take_along_axis(dets, order[..., None], axis=1)  # (N, M, 6)
    alive = np.take_along_axis(valid, order, axis=1)
    boxes = d[..., :4]
    extent = np.where(alive[..., None], np.abs(boxes), 0).max(axis=(1, 2), initial=0.0)
    offset = d[..., 5] * (extent[:, None] + np.float32(1.0))  # batched_nms's class offset, per image
    b = boxes + offset[..., None]
    area = (b[..., 2] - b[..., 0]).clip(min=0) * (b[..., 3] - b[..., 1]).clip(min=0)
    w = (np.minimum(b[:, :, None, 2], b[:, None, :, 2]) - np.maximum(b[:, :, None, 0], b[:, None, :, 0])).clip(min=0)
    h = (np.minimum(b[:, :, None, 3], b[:, None, :, 3]) - np.maximum(b[:, :, None, 1], b[:, None, :, 1])).clip(min=0)
    inter = w * h
    over = inter / np.maximum(area[:, :, None] + area[:, None, :] - inter, np.float32(1e-12)) > nms_iou
    for i in range(m - 1):  # greedy: a kept box suppresses the later ones it overlaps
        alive[:, i + 1 :] &= ~(alive[:, i, None] & over[:, i, i + 1 :])
    alive &= np.cumsum(alive, axis=1) <= max_det
    pad = np.array([[i.pad_x, i.pad_y, i.pad_x, i.pad_y] for i in infos], np.float32)[:, None, :]
    hi = np.array([[i.orig_w, i.orig_h, i.orig_w, i.orig_h] for i in infos], np.float32)[:, None, :]
    scale = np.array([i.scale for i in infos], np.float32)[:, None, None]
    orig = np.minimum(np.maximum((boxes - pad) / scale, 0), hi).astype(np.float32)
    out = []
    for j in range(n):
        keep = alive[j]
        out.append(Detections(boxes=orig[j][keep], scores=d[j, keep, 4].copy(), classes=d[j, keep, 5].astype(np.int64)))
    return out
