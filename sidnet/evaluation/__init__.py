"""Evaluation: COCO metrics (:mod:`.metrics`), prediction over a dataset (:mod:`.predict`), an exported ONNX as a
detector (:mod:`.onnx_detector`). The package face re-exports the metrics only (no onnxruntime import)."""

from sidnet.evaluation.metrics import box_iou, evaluate_detections, match_detections, write_report

__all__ = ["box_iou", "evaluate_detections", "match_detections", "write_report"]
