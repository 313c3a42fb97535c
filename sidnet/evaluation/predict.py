"""Run a model over a dataset and return detections (and masks) in original-image pixels, keyed by image id."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch.utils.data import DataLoader

from sidnet.data import collate, unletterbox_boxes
from sidnet.data.masks import encode_masks, unletterbox_masks


class ExportedPredictor(ABC):
    """An exported model run outside PyTorch (e.g. :class:`sidnet.evaluation.onnx_detector.OnnxDetector`), evaluated
    through the same unletterbox and evaluator as a PyTorch model. Subclass it: :func:`predict_dataset` dispatches on
    this type, never on attribute names (a PyTorch model may have methods of any name).

    ``iou_types``: ``("bbox",)``, or ``("bbox", "segm")`` when :meth:`predict` returns ``masks``.
    """

    iou_types: tuple[str, ...] = ("bbox",)
    input_size: int

    @abstractmethod
    def predict(self, images: torch.Tensor, *, conf_thresh: float, nms_iou: float,
                max_det: int) -> list[dict[str, torch.Tensor]]:  # fmt: skip
        """Letterboxed float images (N, 3, S, S) → one dict per image, as :meth:`sidnet.engine.tasks.Task.predict`
        returns (``boxes`` xyxy input pixels, ``scores``, ``labels`` and optionally ``masks`` (P, S, S))."""


@torch.no_grad()
def predict_dataset(
    model,
    dataset,
    *,
    task,
    device: torch.device,
    batch_size: int = 16,
    conf_thresh: float = 0.001,
    nms_iou: float = 0.45,
    max_det: int = 100,
    amp: bool = False,
    workers: int = 0,
    desc: str = "predict",
) -> tuple[dict[int, np.ndarray], dict[int, list[dict]] | None]:
    """``({image_id: (P, 6) float32 [x1, y1, x2, y2, score, class]}, masks)`` in the original image's pixels.

    ``masks`` is ``None`` unless ``task`` predicts masks; then ``{image_id: [P COCO RLE dicts]}``, each mask thresholded
    at 0.5 after mapping it back to the original image, row for row with the detections.

    ``model`` is a ``torch.nn.Module`` run through ``task`` (:mod:`sidnet.engine.tasks`), or an
    :class:`ExportedPredictor` (``task`` ignored: the predictor says what it predicts); anything else is a TypeError.
    ``desc`` labels the progress bar (:mod:`sidnet.progress`).
    """
    from sidnet.progress import progress

    if isinstance(model, ExportedPredictor):
        iou_types = model.iou_types
    elif isinstance(model, torch.nn.Module):
        if task is None:
            raise TypeError(f"predict_dataset needs the task of a {type(model).__name__} (sidnet.engine.tasks)")
        model.eval()
        iou_types = task.iou_types
    else:
        raise TypeError(f"cannot predict with a {type(model).__name__}: pass a torch.nn.Module and its task, or an "
                        "ExportedPredictor")  # fmt: skip
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)
    out: dict[int, np.ndarray] = {}
    masks: dict[int, list[dict]] | None = {} if "segm" in iou_types else None
    for images, targets in progress(loader, desc=desc, total=len(loader), unit="batch"):
        if isinstance(model, ExportedPredictor):
            preds = model.predict(images, conf_thresh=conf_thresh, nms_iou=nms_iou, max_det=max_det)
        else:
            preds = task.predict(model, images.to(device, non_blocking=True), conf_thresh=conf_thresh,
                                 nms_iou=nms_iou, max_det=max_det, amp=amp)  # fmt: skip
        for p, t in zip(preds, targets, strict=True):
            boxes = unletterbox_boxes(p["boxes"].float().cpu().numpy(), t["letterbox"])
            dets = np.concatenate([boxes, p["scores"].float().cpu().numpy()[:, None],
                                   p["labels"].cpu().numpy()[:, None].astype(np.float32)], axis=1)  # fmt: skip
            out[int(t["image_id"])] = dets.astype(np.float32)
            if masks is not None:
                full = unletterbox_masks(p["masks"].float().cpu().numpy(), t["letterbox"]) >= 0.5
                masks[int(t["image_id"])] = encode_masks(full)
    return out, masks
