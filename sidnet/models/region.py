"""YOLOv2 region decode in PyTorch: the reference the CUDA kernels and TensorRT plugins are checked against.

Raw head layout (Darknet's): ``raw`` is (N, A·(5+C), H, W); the channels of anchor ``a`` are
``a·(5+C) + [tx, ty, tw, th, to, cls_0 … cls_{C-1}]``. Grid cells are flattened as ``m = a·H·W + y·W + x``.
Anchors are (w, h) in network-input pixels (the anchor-tuning script writes them in that unit).
"""

from __future__ import annotations

import torch
from torch import nn


def _split(raw: torch.Tensor, num_anchors: int) -> torch.Tensor:
    n, ch, h, w = raw.shape
    if ch % num_anchors:
        raise ValueError(f"region: {ch} channels is not a multiple of {num_anchors} anchors")
    # (N, A, 5+C, H, W) → (N, A, H, W, 5+C): one row of fields per prediction.
    return raw.reshape(n, num_anchors, ch // num_anchors, h, w).permute(0, 1, 3, 4, 2)


def region_decode(raw: torch.Tensor, anchors: torch.Tensor, *, stride: tuple[float, float]) -> torch.Tensor:
    """Dense decode: (N, A·(5+C), H, W) → (N, A·H·W, 5+C) float32 rows ``[cx, cy, w, h, obj, p_0 … p_{C-1}]``.

    ``cx = (sigmoid(tx) + x)·sx``, ``w = exp(tw)·anchor_w`` (input pixels), ``obj = sigmoid(to)``,
    ``p = softmax(cls)``. ``stride`` is (sx, sy) = input size / grid size.
    """
    p = _split(raw.float(), anchors.shape[0])
    n, a, h, w, _ = p.shape
    anchors = anchors.to(p)
    ys = torch.arange(h, device=p.device, dtype=p.dtype).view(1, 1, h, 1)
    xs = torch.arange(w, device=p.device, dtype=p.dtype).view(1, 1, 1, w)
    cx = (torch.sigmoid(p[..., 0]) + xs) * stride[0]
    cy = (torch.sigmoid(p[..., 1]) + ys) * stride[1]
    bw = torch.exp(p[..., 2]) * anchors[:, 0].view(1, a, 1, 1)
    bh = torch.exp(p[..., 3]) * anchors[:, 1].view(1, a, 1, 1)
    obj = torch.sigmoid(p[..., 4])
    cls = torch.softmax(p[..., 5:], dim=-1)
    out = torch.cat([torch.stack([cx, cy, bw, bh, obj], dim=-1), cls], dim=-1)
    return out.reshape(n, a * h * w, -1)


def scores_and_boxes(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense rows → (boxes xyxy (N, M, 4), score (N, M) = obj·max_c p_c, class (N, M) int64)."""
    cxcy, wh = dense[..., 0:2], dense[..., 2:4]
    boxes = torch.cat([cxcy - wh / 2, cxcy + wh / 2], dim=-1)
    cls_prob, cls = dense[..., 5:].max(dim=-1)
    return boxes, dense[..., 4] * cls_prob, cls


def region_topk(
    raw: torch.Tensor,
    anchors: torch.Tensor,
    *,
    stride: tuple[float, float],
    conf_thresh: float,
    topk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode + threshold + top-K compaction, the semantics of the fused ``regionTopK`` kernel.

    Returns ``dets`` float32 (N, topk, 6) rows ``[x1, y1, x2, y2, score, class]`` sorted by score descending
    (ties: lower flat index ``m`` first), zero rows after the valid ones, and ``num`` int32 (N,) valid rows.
    """
    boxes, score, cls = scores_and_boxes(region_decode(raw, anchors, stride=stride))
    n, m = score.shape
    dets = torch.zeros(n, topk, 6, dtype=torch.float32, device=raw.device)
    num = torch.zeros(n, dtype=torch.int32, device=raw.device)
    for i in range(n):
        keep = torch.nonzero(score[i] >= conf_thresh).flatten()
        # Stable sort on the score keeps ascending m among equal scores.
        order = torch.sort(score[i, keep], descending=True, stable=True).indices[:topk]
        idx = keep[order]
        k = idx.numel()
        dets[i, :k, :4] = boxes[i, idx]
        dets[i, :k, 4] = score[i, idx]
        dets[i, :k, 5] = cls[i, idx].float()
        num[i] = k
    return dets, num


class RegionDecode(nn.Module):
    """Module form of :func:`region_decode`; holds the anchors (input pixels) as a buffer.

    ``forward(raw)`` → (N, A·H·W, 5+C). Export and graph surgery find the decode by this type.
    """

    def __init__(self, anchors: torch.Tensor | list, *, num_classes: int, input_size: int) -> None:
        super().__init__()
        self.register_buffer("anchors", torch.as_tensor(anchors, dtype=torch.float32).reshape(-1, 2))
        self.num_classes = num_classes
        self.input_size = input_size

    @property
    def num_anchors(self) -> int:
        return self.anchors.shape[0]

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        h, w = raw.shape[-2:]
        return region_decode(raw, self.anchors, stride=(self.input_size / w, self.input_size / h))

    def extra_repr(self) -> str:
        return f"anchors={self.anchors.tolist()}, num_classes={self.num_classes}"
