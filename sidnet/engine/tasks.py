"""The one interface the trainer, the predictor and the evaluator call, whatever the model family.

A task knows how a model family computes its training loss and turns images into detections:

- :class:`RegionTask` — YOLOv2 family (SIDNet): the raw head map, :class:`~sidnet.models.loss.RegionLoss`, region
  decode + NMS (:func:`sidnet.postprocess.postprocess`). Evaluated on boxes.
- :class:`InstanceSegmentationTask` — :class:`~sidnet.models.maskrcnn.PersonMaskRCNN`: the model's own loss dict and
  detections with per-instance masks. Evaluated on boxes and masks; its datasets carry masks.

``loss(model, images, targets)`` → ``(total, parts)``; ``predict(model, images, ...)`` → one dict per image with
``boxes`` (P, 4) xyxy in input pixels, ``scores`` (P,), ``labels`` (P,) int64 and, for instance segmentation,
``masks`` (P, S, S) float probabilities; score-sorted, at most ``max_det`` rows, ``scores >= conf_thresh``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from sidnet.models.loss import RegionLoss
from sidnet.models.maskrcnn import PersonMaskRCNN
from sidnet.models.yolo import YOLOv2


class Task(Protocol):
    iou_types: tuple[str, ...]  # what the evaluator scores: "bbox", and "segm" when the task predicts masks

    def to(self, device: torch.device) -> Task: ...

    def loss(self, model: nn.Module, images: torch.Tensor, targets: list[dict[str, Any]],
             *, amp: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...  # fmt: skip

    def predict(self, model: nn.Module, images: torch.Tensor, *, conf_thresh: float, nms_iou: float, max_det: int,
                amp: bool) -> list[dict[str, torch.Tensor]]: ...  # fmt: skip


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda")


class RegionTask:
    """YOLOv2-family training (region loss on the raw map, computed in float32) and decode + NMS."""

    iou_types = ("bbox",)

    def __init__(self, model: YOLOv2, *, loss: dict[str, Any]) -> None:
        self.criterion = RegionLoss(model.anchors, num_classes=model.num_classes, input_size=model.input_size, **loss)

    def to(self, device: torch.device) -> RegionTask:
        self.criterion = self.criterion.to(device)
        return self

    def loss(self, model, images, targets, *, amp):
        with _autocast(images.device, amp):
            raw = model(images)
        return self.criterion(raw.float(), targets, input_size=images.shape[-1])

    def predict(self, model, images, *, conf_thresh, nms_iou, max_det, amp):
        from sidnet.postprocess import postprocess

        with _autocast(images.device, amp):
            dense = model.predict(images)
        dets = postprocess(dense.float(), conf_thresh=conf_thresh, nms_iou=nms_iou, max_det=max_det)
        return [{"boxes": d[:, :4], "scores": d[:, 4], "labels": d[:, 5].long()} for d in dets]


class InstanceSegmentationTask:
    """Mask R-CNN: torchvision's five losses summed; detections thresholded and capped like the region task's
    (its own NMS, at the builder's 0.5 per class, is part of the model)."""

    iou_types = ("bbox", "segm")

    def __init__(self, model: PersonMaskRCNN) -> None:
        self.input_size = model.input_size

    def to(self, device: torch.device) -> InstanceSegmentationTask:
        return self

    def loss(self, model, images, targets, *, amp):
        dev = images.device
        moved = [{"boxes": t["boxes"].to(dev), "labels": t["labels"].to(dev), "masks": t["masks"].to(dev),
                  "has_masks": t.get("has_masks", True)} for t in targets]  # fmt: skip
        with _autocast(dev, amp):
            total, parts = model.loss(images, moved)
        return total.float(), {k: v.float() for k, v in parts.items()}

    def predict(self, model, images, *, conf_thresh, nms_iou, max_det, amp):  # noqa: ARG002  (NMS is in the model)
        with _autocast(images.device, amp):
            out = model.detect(images)
        result = []
        for o in out:
            keep = (o["scores"] >= conf_thresh).nonzero().flatten()[:max_det]
            result.append({k: v[keep].float() if v.is_floating_point() else v[keep] for k, v in o.items()})
        return result


def build_task(model: nn.Module, *, loss: dict[str, float] | None = None) -> Task:
    """The task for ``model``'s family; ``loss``: RegionLoss keyword arguments (YOLOv2 family only)."""
    if isinstance(model, PersonMaskRCNN):
        return InstanceSegmentationTask(model)
    if isinstance(model, YOLOv2):
        return RegionTask(model, loss=loss or {})
    raise TypeError(f"no task for a {type(model).__name__}; register it in sidnet.engine.tasks.build_task")
