"""Dense decoded rows → per-image detections in original-image pixels (threshold, NMS, unletterbox)."""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms

from sidnet.models.region import scores_and_boxes


def postprocess(
    dense: torch.Tensor, *, conf_thresh: float, nms_iou: float = 0.45, max_det: int = 100
) -> list[torch.Tensor]:
    """(N, M, 5+C) rows from ``RegionDecode`` → N tensors (P, 6) ``[x1, y1, x2, y2, score, class]`` in input
    pixels, score-sorted, class-wise NMS at ``nms_iou``, at most ``max_det`` per image."""
    boxes, scores, classes = scores_and_boxes(dense)
    out = []
    for b, s, c in zip(boxes, scores, classes, strict=True):
        keep = s >= conf_thresh
        b, s, c = b[keep], s[keep], c[keep]
        idx = batched_nms(b, s, c, nms_iou)[:max_det]
        out.append(torch.cat([b[idx], s[idx, None], c[idx, None].float()], dim=1))
    return out
