"""Person-detection evaluation: COCO AP via pycocotools plus counts at a fixed operating confidence.

Two views of the same detections:

- **COCO bbox metrics** over all images (images without persons included, so their false positives cost AP):
  ``AP`` (IoU 0.50:0.95), ``AP50``, ``AP75``, ``AP_small``, ``AP_medium``, ``AP_large``, ``AR100``. Areas for the
  size ranges are box areas ``w * h`` (official COCO uses mask areas). A metric pycocotools cannot define (it
  returns -1, e.g. ``AP_small`` with no small ground truth) is reported as ``None`` so the JSON stays valid.
- **Operating point** (the SIDNet paper deploys at confidence 0.3): detections with ``score >= operating_conf`` are
  matched greedily per image in descending score order to the unmatched ground-truth box of highest IoU; a match
  needs ``IoU >= iou_match``. This gives ``tp``, ``fp``, ``fn``, ``recall``, ``precision`` and
  ``fp_per_negative_image`` (false positives on images with no person, divided by the number of such images).
  A ratio with a zero denominator is reported as 0.0 (e.g. precision with no detections); the counts are in the
  report so the reader can tell.
- **COCO segm metrics** (instance segmentation, when ``masks`` are given): the same names prefixed ``segm_``
  (``segm_AP``, ``segm_AP50``, ...), from pycocotools' mask IoU between the predicted masks (RLE, original pixels,
  row for row with the detections) and the records' polygons / RLE masks.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sidnet.io import atomic_write_text

__all__ = ["COCO_STAT_NAMES", "box_iou", "evaluate_detections", "match_detections", "write_report"]

# Order of COCOeval.stats for iouType="bbox"; only the names listed here are reported.
_COCO_STATS_INDEX = {"AP": 0, "AP50": 1, "AP75": 2, "AP_small": 3, "AP_medium": 4, "AP_large": 5, "AR100": 8}
COCO_STAT_NAMES: tuple[str, ...] = tuple(_COCO_STATS_INDEX)

_PERSON_CATEGORY_ID = 1  # COCO's id for person; the evaluation only ever has this one category.


class GroundTruthRecord(Protocol):
    """What :func:`evaluate_detections` needs from a record (``sidnet.data.ImageRecord`` satisfies it)."""

    image_id: int
    width: int
    height: int
    boxes: np.ndarray  # (K, 4) float32 xyxy, original-image pixels
    labels: np.ndarray  # (K,) int64; optional: without it every box is a person


def box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``(N, 4)`` and ``(M, 4)`` xyxy boxes, returning ``(N, M)`` float64 (continuous pixels, no +1)."""
    a = np.asarray(boxes1, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes2, dtype=np.float64).reshape(-1, 4)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clip(min=0).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).clip(min=0).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).clip(min=0).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_detections(
    gt_boxes: np.ndarray, det_boxes: np.ndarray, det_scores: np.ndarray, *, iou_match: float = 0.5
) -> tuple[int, int, int]:
    """Greedy one-to-one matching of one image's detections to its ground truth.

    Detections are visited in descending score order (ties keep input order); each takes the still-unmatched
    ground-truth box with the highest IoU if that IoU is ``>= iou_match`` (the COCO rule), otherwise it is a false
    positive.

    Args:
        gt_boxes: ``(G, 4)`` xyxy ground truth.
        det_boxes: ``(D, 4)`` xyxy detections, already filtered by confidence.
        det_scores: ``(D,)`` scores.
        iou_match: minimum IoU for a true positive.

    Returns:
        ``(tp, fp, fn)`` counts for the image.
    """
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    det_boxes = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(det_scores, dtype=np.float64), kind="stable")
    iou = box_iou(det_boxes[order], gt_boxes)
    matched = np.zeros(len(gt_boxes), dtype=bool)
    tp = 0
    for row in iou:
        candidates = np.where(matched, -1.0, row)
        if len(candidates) and candidates.max() >= iou_match:
            matched[candidates.argmax()] = True
            tp += 1
    return tp, len(det_boxes) - tp, len(gt_boxes) - tp


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / denominator if denominator > 0 else 0.0


def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _person_gt(record: GroundTruthRecord, person_label: int) -> np.ndarray:
    boxes = np.asarray(record.boxes, dtype=np.float64).reshape(-1, 4)
    labels = getattr(record, "labels", None)
    if labels is None:
        return boxes
    return boxes[np.asarray(labels).reshape(-1) == person_label]


def _person_predictions(image_id: int, predictions: Mapping[int, np.ndarray], person_label: int) -> np.ndarray:
    pred = np.asarray(predictions.get(image_id, np.zeros((0, 6))), dtype=np.float64)
    if pred.size == 0:
        return np.zeros((0, 6))
    if pred.ndim != 2 or pred.shape[1] != 6:
        raise ValueError(f"predictions[{image_id}] must have shape (P, 6) [x1,y1,x2,y2,score,label], got {pred.shape}")
    return pred[pred[:, 5] == person_label]


def _coco_stats(
    images: list[dict[str, Any]],
    gt_annotations: list[dict[str, Any]],
    detections: list[dict[str, Any]],
    iou_type: str = "bbox",
) -> dict[str, float | None]:
    """Run COCOeval (``bbox`` or ``segm``) on in-memory ground truth and detections, printing silenced."""
    categories = [{"id": _PERSON_CATEGORY_ID, "name": "person"}]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": gt_annotations, "categories": categories}
        coco_gt.createIndex()
        if detections:
            coco_dt = coco_gt.loadRes(detections)
        else:
            # loadRes indexes anns[0]; an empty result set is valid input to COCOeval and scores 0 where GT exists.
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(images), "annotations": [], "categories": categories}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {}
    for name, index in _COCO_STATS_INDEX.items():
        value = float(evaluator.stats[index])
        stats[name] = None if value < 0 or math.isnan(value) else value
    return stats


def evaluate_detections(
    records: Sequence[GroundTruthRecord],
    predictions: Mapping[int, np.ndarray],
    *,
    operating_conf: float = 0.3,
    iou_match: float = 0.5,
    person_label: int = 0,
    masks: Mapping[int, list[dict]] | None = None,
) -> dict[str, Any]:
    """Evaluate person detections against ground truth (see the module docstring for every metric).

    Args:
        records: one per evaluated image, with ``image_id``, ``width``, ``height``, ``boxes`` ``(K, 4)`` xyxy in
            original pixels and optionally ``labels`` ``(K,)`` (only ``person_label`` boxes are kept). Images
            without person boxes are the negatives.
        predictions: ``image_id -> (P, 6)`` array ``[x1, y1, x2, y2, score, label]`` in original pixels; images
            missing from the mapping have no detections; rows whose label is not ``person_label`` are ignored.
        operating_conf: confidence at which the operating-point counts are taken (``score >= operating_conf``).
        iou_match: IoU needed for a true positive at the operating point.
        person_label: class index of person in ``labels`` and predictions.
        masks: ``image_id -> [P COCO RLE dicts]`` row for row with ``predictions[image_id]`` (before the person
            filter): adds the ``segm_*`` metrics, against the records' ``polygons`` / ``rles``.

    Returns:
        A flat JSON-ready dict: the COCO metrics (float or None), ``operating_conf``, ``iou_match``, ``tp``,
        ``fp``, ``fn``, ``recall``, ``precision``, ``fp_per_negative_image``, ``fp_on_negative_images``,
        ``num_images``, ``num_negative_images``, ``num_gt_boxes``, ``num_predictions``,
        ``num_predictions_at_conf``.
    """
    image_ids = [int(r.image_id) for r in records]
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("records contain duplicate image_id values; every image needs a unique id")
    unknown = sorted(set(int(i) for i in predictions) - set(image_ids))
    if unknown:
        raise ValueError(f"predictions for image ids not in records (first: {unknown[:5]}); evaluate matching splits")

    images, gt_annotations, detections = [], [], []
    gt_segm, det_segm = [], []
    tp = fp = fn = fp_negative = num_negative = num_gt = num_at_conf = 0
    for record in records:
        image_id = int(record.image_id)
        gt = _person_gt(record, person_label)
        pred = _person_predictions(image_id, predictions, person_label)
        if masks is not None:
            gt_segm.extend(_gt_segmentations(record, person_label, first_id=len(gt_segm) + 1))
            det_segm.extend(_det_segmentations(image_id, predictions, masks, person_label))
        images.append({"id": image_id, "width": int(record.width), "height": int(record.height)})
        for box in _xyxy_to_xywh(gt):
            # Annotation ids must start at 1: COCOeval uses id 0 to mean "unmatched".
            gt_annotations.append(
                {
                    "id": len(gt_annotations) + 1,
                    "image_id": image_id,
                    "category_id": _PERSON_CATEGORY_ID,
                    "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
            )
        for box, score in zip(_xyxy_to_xywh(pred[:, :4]), pred[:, 4], strict=True):
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": _PERSON_CATEGORY_ID,
                    "bbox": [float(v) for v in box],
                    "score": float(score),
                }
            )

        keep = pred[:, 4] >= operating_conf
        image_tp, image_fp, image_fn = match_detections(gt, pred[keep, :4], pred[keep, 4], iou_match=iou_match)
        tp, fp, fn = tp + image_tp, fp + image_fp, fn + image_fn
        num_gt += len(gt)
        num_at_conf += int(keep.sum())
        if len(gt) == 0:
            num_negative += 1
            fp_negative += image_fp

    report: dict[str, Any] = _coco_stats(images, gt_annotations, detections)
    if masks is not None:
        segm = _coco_stats(images, gt_segm, det_segm, iou_type="segm")
        report.update({f"segm_{k}": v for k, v in segm.items()})
    report.update(
        operating_conf=float(operating_conf),
        iou_match=float(iou_match),
        tp=tp,
        fp=fp,
        fn=fn,
        recall=_ratio(tp, tp + fn),
        precision=_ratio(tp, tp + fp),
        fp_per_negative_image=_ratio(fp_negative, num_negative),
        fp_on_negative_images=fp_negative,
        num_images=len(images),
        num_negative_images=num_negative,
        num_gt_boxes=num_gt,
        num_predictions=len(detections),
        num_predictions_at_conf=num_at_conf,
    )
    return report


def _gt_segmentations(record: GroundTruthRecord, person_label: int, *, first_id: int) -> list[dict[str, Any]]:
    """COCO annotations with ``segmentation`` (polygons or RLE) for a record's person boxes."""
    labels = getattr(record, "labels", None)
    polys, rles = getattr(record, "polygons", ()), getattr(record, "rles", ())
    out = []
    for k, box in enumerate(_xyxy_to_xywh(np.asarray(record.boxes).reshape(-1, 4))):
        if labels is not None and int(np.asarray(labels).reshape(-1)[k]) != person_label:
            continue
        poly = polys[k] if k < len(polys) else ()
        rle = rles[k] if k < len(rles) else None
        if len(poly):
            segmentation = [np.asarray(p, dtype=np.float64).reshape(-1).tolist() for p in poly]
        elif rle is not None:
            segmentation = rle
        else:
            raise ValueError(f"image {record.image_id}: box {k} has no mask; load the split with masks=True")
        out.append({"id": first_id + len(out), "image_id": int(record.image_id), "category_id": _PERSON_CATEGORY_ID,
                    "segmentation": segmentation, "area": float(box[2] * box[3]), "bbox": [float(v) for v in box],
                    "iscrowd": 0})  # fmt: skip
    return out


def _det_segmentations(image_id: int, predictions: Mapping[int, np.ndarray], masks: Mapping[int, list[dict]],
                       person_label: int) -> list[dict[str, Any]]:  # fmt: skip
    pred = np.asarray(predictions.get(image_id, np.zeros((0, 6))), dtype=np.float64).reshape(-1, 6)
    rles = list(masks.get(image_id, []))
    if len(rles) != len(pred):
        raise ValueError(f"image {image_id}: {len(rles)} masks for {len(pred)} detections; they must be row for row")
    return [{"image_id": int(image_id), "category_id": _PERSON_CATEGORY_ID, "segmentation": rle, "score": float(p[4])}
            for p, rle in zip(pred, rles, strict=True) if int(p[5]) == person_label]  # fmt: skip


def _json_ready(value: Any) -> Any:
    """Convert numpy scalars/arrays and NaN to plain JSON values (NaN -> None keeps the file standard JSON)."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(
    report: Mapping[str, Any], path: str | os.PathLike[str], *, extra: Mapping[str, Any] | None = None
) -> None:
    """Write ``report`` merged with ``extra`` (command, model, checkpoint, device, date, versions, ...) as JSON.

    The write is atomic (temporary file in the same directory, then ``os.replace``) so a crash never leaves a
    truncated report. ``extra`` must not reuse a metric name: silently overwriting a metric would falsify it.
    """
    extra = dict(extra or {})
    clashes = sorted(set(extra) & set(report))
    if clashes:
        raise ValueError(f"extra fields {clashes} clash with report metrics; rename them")
    payload = _json_ready({**report, **extra})
    atomic_write_text(path, json.dumps(payload, indent=2, allow_nan=False) + "\n")
