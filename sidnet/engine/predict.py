"""Run a model over a dataset and return detections in original-image pixels, keyed by image id."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from sidnet.data import collate, unletterbox_boxes
from sidnet.postprocess import postprocess


@torch.no_grad()
def predict_dataset(
    model,
    dataset,
    *,
    device: torch.device,
    batch_size: int = 16,
    conf_thresh: float = 0.001,
    nms_iou: float = 0.45,
    max_det: int = 100,
    amp: bool = False,
    workers: int = 0,
) -> dict[int, np.ndarray]:
    """``{image_id: (P, 6) float32 [x1, y1, x2, y2, score, class]}`` in the original image's pixels.

    ``model``: a detector ``nn.Module`` (``predict`` → dense rows, then threshold + NMS here) or any object with
    ``detect(images, nms_iou=, max_det=)`` returning per-image rows in input pixels (an exported ONNX through
    :class:`sidnet.engine.onnx_detector.OnnxDetector`): both go through the same unletterbox and evaluation.
    """
    if isinstance(model, torch.nn.Module):
        model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)
    out: dict[int, np.ndarray] = {}
    for images, targets in loader:
        if hasattr(model, "detect"):
            per_image = model.detect(images, nms_iou=nms_iou, max_det=max_det)
            per_image = [d[d[:, 4] >= conf_thresh] for d in per_image]
        else:
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
                dense = model.predict(images.to(device, non_blocking=True))
            per_image = postprocess(dense.float(), conf_thresh=conf_thresh, nms_iou=nms_iou, max_det=max_det)
        for dets, t in zip(per_image, targets, strict=True):
            dets = dets.cpu().numpy()
            dets[:, :4] = unletterbox_boxes(dets[:, :4], t["letterbox"])
            out[int(t["image_id"])] = dets.astype(np.float32)
    return out
