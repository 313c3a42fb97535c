"""Mask R-CNN outside PyTorch training: ``train.evaluate --onnx`` (segm + box AP of the exported graph) and the runtime
(onnxruntime and torch backends, masks in the results, zones entered by the mask)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sidnet.runtime.nms import Detections
from sidnet.runtime.zones import Zone, ZoneConfig, update_zones
from tests import golden as g

VAL = g.ROOT / "sidnet" / "sample" / "images" / "val2017"


def _records():
    from sidnet.data.config import load_data_yaml
    from sidnet.data.loading import load_records

    data = load_data_yaml(g.ROOT / "conf/data/sample_seg.yaml", project_root=g.ROOT)
    return load_records(data, "val", project_root=g.ROOT, masks=True)


def _mask_iou(a: dict, b: dict) -> float:
    from pycocotools import mask as mask_utils

    enc = [{"size": r["size"], "counts": r["counts"].encode()} for r in (a, b)]
    if not mask_utils.area(enc[0]) and not mask_utils.area(enc[1]):
        return 1.0  # both empty (a degenerate box of an undertrained model): equal
    return float(mask_utils.iou([enc[0]], [enc[1]], [0])[0, 0])


def test_onnx_maskrcnn_scores_like_its_checkpoint(golden):
    """Same images, same evaluator: the exported graph's box and segm AP equal the checkpoint's within 0.005, and its
    detections match row for row (box corners within 1 px and scores within 1e-3, then mask IoU >= 0.9)."""
    from sidnet.checkpoint import load_checkpoint, model_from_checkpoint
    from sidnet.data import DetectionDataset
    from sidnet.engine.tasks import build_task
    from sidnet.evaluation import evaluate_detections
    from sidnet.evaluation.onnx_detector import OnnxDetector
    from sidnet.evaluation.predict import predict_dataset

    run = golden.trained("maskrcnn")
    model = model_from_checkpoint(load_checkpoint(run / "last.pt"))
    onnx = OnnxDetector(golden.exported("maskrcnn", "onnx") / "model.onnx")
    assert onnx.iou_types == ("bbox", "segm") and onnx.batch == 1
    records = _records()
    dataset = DetectionDataset(records, size=model.input_size, masks=True)
    cpu = torch.device("cpu")
    ref_boxes, ref_masks = predict_dataset(model, dataset, task=build_task(model), device=cpu, conf_thresh=0.05)
    got_boxes, got_masks = predict_dataset(onnx, dataset, task=None, device=cpu, conf_thresh=0.05)
    assert sum(len(v) for v in ref_boxes.values()) > 0, "the checkpoint detects nothing: the comparison is empty"
    rows = matched = 0
    for image_id, ref in ref_boxes.items():
        got = got_boxes[image_id]
        assert abs(len(ref) - len(got)) <= max(2, len(ref) // 10), (image_id, len(ref), len(got))
        for k in range(len(ref)):  # near-ties in score may swap rows: find each row's twin (boxes may be degenerate)
            rows += 1
            close = (np.abs(got[:, :4] - ref[k, :4]).max(1) <= 1.0) & (np.abs(got[:, 4] - ref[k, 4]) <= 1e-3)
            if close.any():
                j = int(np.nonzero(close)[0][0])
                assert _mask_iou(ref_masks[image_id][k], got_masks[image_id][j]) >= 0.9, (image_id, k)
                matched += 1
    assert rows > 0 and matched >= 0.9 * rows, f"only {matched} of {rows} checkpoint rows found in the export"
    ref = evaluate_detections(records, ref_boxes, operating_conf=0.3, masks=ref_masks)
    got = evaluate_detections(records, got_boxes, operating_conf=0.3, masks=got_masks)
    for key in ("AP", "AP50", "segm_AP", "segm_AP50"):
        assert abs(ref[key] - got[key]) <= 0.005, (key, ref[key], got[key])


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_detector_returns_masks(golden, backend):
    """Both backends return per-detection boolean masks of the frame's size, and agree with each other."""
    import cv2

    from sidnet.runtime.detector import Detector

    frames = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(VAL.glob("*.jpg"))[:2]]
    onnx_path = golden.exported("maskrcnn", "onnx") / "model.onnx"
    artifact = onnx_path if backend == "onnxruntime" else golden.trained("maskrcnn") / "last.pt"
    options = {"device": "cpu"}
    with Detector(artifact, conf_thresh=0.05, **options) as det, Detector(onnx_path, conf_thresh=0.05) as ref:
        assert det.backend_name == backend
        results, expected = det(frames), ref(frames)
    assert sum(len(r) for r in results) > 0
    for f, r, e in zip(frames, results, expected, strict=True):
        assert r.masks is not None and r.masks.dtype == bool and r.masks.shape == (len(r), *f.shape[:2])
        assert len(r) == len(e)
        for m, n in zip(r.masks, e.masks, strict=True):
            union = (m | n).sum()
            assert union == 0 or (m & n).sum() / union >= 0.9


def test_zone_entered_by_mask_not_by_foot():
    """A person whose mask reaches into the zone while the foot point stays outside: counted with ``inside: mask``
    only; ``inside: mask`` without masks is a one-line error."""
    from sidnet.runtime.errors import DeployError

    mask = np.zeros((1, 100, 100), bool)
    mask[0, 10:90, 40:60] = True  # a standing person, feet at y = 90
    dets = Detections(boxes=np.array([[40, 10, 60, 90]], np.float32), scores=np.array([0.9], np.float32),
                      classes=np.zeros(1, np.int64), masks=mask)  # fmt: skip
    zone = [[0, 0], [100, 0], [100, 30], [0, 30]]  # the top strip: the head is in it, the feet are not
    for inside, expected in (("foot", 0), ("mask", 1)):
        cfg = ZoneConfig(debounce_frames=1, inside=inside)
        z = Zone("top", np.array(zone, np.float32))
        counts, events = update_zones([z], dets, time=0.0, frame=0, stream="cam", cfg=cfg, class_names=["person"])
        assert counts == {"top": expected} and len(events) == expected
    no_masks = Detections(dets.boxes, dets.scores, dets.classes)
    with pytest.raises(DeployError, match="inside: mask needs instance masks"):
        update_zones([Zone("top", np.array(zone, np.float32))], no_masks, time=0.0, frame=0, stream="cam",
                     cfg=ZoneConfig(inside="mask"), class_names=["person"])  # fmt: skip


def test_zones_yaml_inside_option(tmp_path: Path):
    from sidnet.runtime.errors import DeployError
    from sidnet.runtime.zones import load_zones

    path = tmp_path / "z.yaml"
    path.write_text("inside: mask\nstreams:\n  cam: [{name: a, polygon: [[0, 0], [9, 0], [9, 9]]}]\n")
    assert load_zones(path, streams=["cam"]).inside == "mask"
    path.write_text("inside: head\nstreams:\n  cam: [{name: a, polygon: [[0, 0], [9, 0], [9, 9]]}]\n")
    with pytest.raises(DeployError, match="inside: 'head'; use foot"):
        load_zones(path, streams=["cam"])
