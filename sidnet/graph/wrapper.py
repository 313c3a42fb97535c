"""The deployed model: detector → fixed-size top-K decode, written so that ``torch.onnx.export`` can trace it.

:func:`sidnet.models.region.region_topk` is the reference (a Python loop over images, ``nonzero`` and a stable sort);
:class:`TopKDecode` computes the same thing with static shapes only: ``topk`` over all A·H·W scores, gather, zero the
rows under the threshold. ONNX ``TopK`` breaks ties by lower index, like the reference's stable sort.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sidnet.models.region import region_decode, scores_and_boxes

INPUT_NAME = "images"
OUTPUT_NAMES = ("detections", "num_detections")
RAW_NAME = "raw"  # graph surgery gives the head's output this name: the RegionDecode input and the FP16 boundary


class TopKDecode(nn.Module):
    """Raw head map (N, A·(5+C), H, W) → ``detections`` float32 (N, topk, 6), ``num_detections`` int32 (N,).

    Rows are ``[x1, y1, x2, y2, score, class]`` in input pixels, score descending, zero rows after the
    ``num_detections`` valid ones (score >= ``conf_thresh``). Graph surgery finds this module by its path,
    ``decode``, and replaces it by one ``sidnet::RegionDecode`` node (plugins target) or keeps it (native target).
    """

    def __init__(self, anchors: torch.Tensor, *, input_size: int, conf_thresh: float, topk: int) -> None:
        super().__init__()
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.register_buffer("anchors", anchors.detach().clone().float().reshape(-1, 2))
        self.input_size = input_size
        self.conf_thresh = conf_thresh
        self.topk = topk

    def stride(self, raw: torch.Tensor) -> tuple[float, float]:
        h, w = raw.shape[-2:]
        return self.input_size / w, self.input_size / h

    def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        boxes, score, cls = scores_and_boxes(region_decode(raw, self.anchors, stride=self.stride(raw)))
        k = min(self.topk, score.shape[1])  # a static int: the grid size is fixed at export
        top, idx = torch.topk(score, k, dim=1)
        dets = torch.cat(
            [
                torch.gather(boxes, 1, idx.unsqueeze(-1).expand(-1, -1, 4)),
                top.unsqueeze(-1),
                torch.gather(cls, 1, idx).unsqueeze(-1).float(),
            ],
            dim=-1,
        )
        valid = top >= self.conf_thresh  # a prefix of each row, since ``top`` is sorted
        dets = torch.where(valid.unsqueeze(-1), dets, torch.zeros_like(dets))
        if k < self.topk:  # fewer cells than topk (small inputs): the contract still has topk rows
            dets = F.pad(dets, (0, 0, 0, self.topk - k))
        return dets, valid.sum(dim=1).to(torch.int32)


class DeployModel(nn.Module):
    """``forward(images)`` → (``detections``, ``num_detections``), the exported contract.

    ``images``: float32 (N, 3, S, S) RGB in [0, 1], letterboxed to S×S with gray (114, 114, 114) padding;
    normalisation is inside the detector. ``raw(images)`` gives the head map for parity checks.
    """

    def __init__(self, model: nn.Module, *, conf_thresh: float, topk: int) -> None:
        super().__init__()
        self.model = model
        self.decode = TopKDecode(model.anchors, input_size=model.input_size, conf_thresh=conf_thresh, topk=topk)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decode(self.model(images))
