"""Run a model over a dataset and return detections (and masks) in original-image pixels, keyed by image id."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from sidnet.data import collate, unletterbox_boxes
from sidnet.data.masks import encode_masks, unletterbox_masks


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
) -> tuple[dict[int, np.ndarray], dict[int, list[dict]] | None]:
    """``({image_id: (P, 6) float32 [x1, y1, x2, y2, score, class]}, masks)`` in the original image's pixels.

    ``masks`` is ``None`` unless ``task`` predicts masks; then ``{image_id: [P COCO RLE dicts]}``, each mask thresholded
    at 0.5 after mapping it back to the original image, row for row with the detections.

    ``model`` may also be any object with ``detect(images, nms_iou=, max_det=)`` returning per-image rows in input
    pixels (an exported ONNX through :class:`sidnet.evaluation.onnx_detector.OnnxDetector`, ``task=None``): it goes
    through the same unletterbox and evaluation.
    """
    if isinstance(model, torch.nn.Module):
        model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)
    out: dict[int, np.ndarray] = {}
    masks: dict[int, list[dict]] | None = {} if task is not None and "segm" in task.iou_types else None
    for images, targets in loader:
        if hasattr(model, "detect"):
            rows = model.detect(images, nms_iou=nms_iou, max_det=max_det)
            preds = [{"boxes": d[d[:, 4] >= conf_thresh, :4], "scores": d[d[:, 4] >= conf_thresh, 4],
                      "labels": d[d[:, 4] >= conf_thresh, 5].long()} for d in rows]  # fmt: skip
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
