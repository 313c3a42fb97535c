"""Tests for sidnet.evaluation: COCO metrics via pycocotools and greedy matching at the operating point."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sidnet.data.records import ImageRecord, make_record
from sidnet.evaluation import box_iou, evaluate_detections, match_detections, write_report


def _record(image_id: int, boxes: list[list[float]], *, width: int = 640, height: int = 480) -> ImageRecord:
    return make_record(
        path=f"{image_id}.jpg", width=width, height=height, boxes=boxes, labels=[0] * len(boxes), image_id=image_id
    )


def _predictions(boxes: list[list[float]], scores: list[float]) -> np.ndarray:
    pred = np.zeros((len(boxes), 6))
    pred[:, :4] = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    pred[:, 4] = scores
    return pred


@pytest.fixture
def records() -> list[ImageRecord]:
    rng = np.random.default_rng(0)
    out = []
    for image_id in range(1, 6):
        xy = rng.uniform(0, 400, size=(3, 2))
        wh = rng.uniform(40, 200, size=(3, 2))
        out.append(_record(image_id, np.concatenate([xy, xy + wh], axis=1).tolist()))
    out.append(_record(6, []))  # a negative image
    return out


def test_box_iou_against_hand_values() -> None:
    iou = box_iou(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]]))
    np.testing.assert_allclose(iou, [[1.0, 50 / 150, 0.0]])
    assert box_iou(np.zeros((0, 4)), np.zeros((2, 4))).shape == (0, 2)


def test_perfect_predictions(records: list[ImageRecord]) -> None:
    predictions = {r.image_id: _predictions(r.boxes.tolist(), [0.9] * len(r.boxes)) for r in records}
    report = evaluate_detections(records, predictions)
    assert report["AP50"] == pytest.approx(1.0)
    assert report["AP"] == pytest.approx(1.0)
    assert report["recall"] == 1.0 and report["precision"] == 1.0
    assert (report["tp"], report["fp"], report["fn"]) == (15, 0, 0)
    assert report["fp_per_negative_image"] == 0.0
    assert (report["num_images"], report["num_negative_images"], report["num_gt_boxes"]) == (6, 1, 15)


def test_predictions_below_operating_conf_do_not_count(records: list[ImageRecord]) -> None:
    predictions = {r.image_id: _predictions(r.boxes.tolist(), [0.29] * len(r.boxes)) for r in records}
    report = evaluate_detections(records, predictions, operating_conf=0.3)
    assert (report["tp"], report["fp"], report["fn"]) == (0, 0, 15)
    assert report["recall"] == 0.0 and report["num_predictions_at_conf"] == 0
    # AP integrates over all scores, so the same detections are still perfect there.
    assert report["AP50"] == pytest.approx(1.0)


def test_shifted_box_is_fp_and_fn() -> None:
    # Shifted by 6 of 10 px: IoU = 40 / 160 = 0.25 < 0.5.
    records = [_record(1, [[0, 0, 10, 10]])]
    report = evaluate_detections(records, {1: _predictions([[6, 0, 16, 10]], [0.9])})
    assert (report["tp"], report["fp"], report["fn"]) == (0, 1, 1)
    assert report["recall"] == 0.0 and report["precision"] == 0.0
    assert report["AP50"] == pytest.approx(0.0)


def test_fp_on_negative_image(records: list[ImageRecord]) -> None:
    predictions = {r.image_id: _predictions(r.boxes.tolist(), [0.9] * len(r.boxes)) for r in records}
    clean = evaluate_detections(records, predictions)
    predictions[6] = _predictions([[10, 10, 60, 90], [100, 100, 150, 200]], [0.95, 0.5])
    report = evaluate_detections(records, predictions)
    assert report["fp_per_negative_image"] == 2.0  # two false alarms on the single negative image
    assert report["fp_on_negative_images"] == 2 and report["fp"] == 2
    assert report["precision"] == pytest.approx(15 / 17)
    # The negative image is part of the COCO ground truth, so a false alarm ranked above the TPs costs AP.
    assert clean["AP50"] == pytest.approx(1.0) and report["AP50"] < 0.99


def test_empty_predictions_report_zeros(records: list[ImageRecord]) -> None:
    report = evaluate_detections(records, {})
    for name in ("AP", "AP50", "AP75", "AR100", "recall", "precision", "fp_per_negative_image"):
        assert report[name] == 0.0, name
    assert (report["tp"], report["fp"], report["fn"]) == (0, 0, 15)
    assert report["num_predictions"] == 0
    json.dumps(report, allow_nan=False)


def test_undefined_metrics_are_none() -> None:
    # No ground truth anywhere: pycocotools returns -1, which must become None (valid JSON), not a number.
    report = evaluate_detections([_record(1, [])], {1: _predictions([[0, 0, 50, 50]], [0.9])})
    assert report["AP"] is None and report["AP50"] is None
    assert report["fp_per_negative_image"] == 1.0
    # A single large box: small/medium ranges have no GT.
    report = evaluate_detections([_record(1, [[0, 0, 200, 200]])], {1: _predictions([[0, 0, 200, 200]], [0.9])})
    assert report["AP_small"] is None and report["AP_medium"] is None and report["AP_large"] == pytest.approx(1.0)


def test_greedy_matching_hand_example() -> None:
    gt = np.array([[0, 0, 10, 10], [4, 0, 14, 10]], dtype=np.float64)  # A, B
    # det1 (0.9): IoU A = 90/110 = 0.818, B = 70/130 = 0.538 -> takes A.
    # det2 (0.8): IoU A = 80/120 = 0.667 (taken), B = 40/160 = 0.25 -> FP; B stays unmatched -> FN.
    # Greedy is not optimal here (det1->B, det2->A would give 2 TPs); that is the defined behaviour.
    dets = np.array([[1, 0, 11, 10], [-2, 0, 8, 10]], dtype=np.float64)
    assert match_detections(gt, dets, np.array([0.9, 0.8])) == (1, 1, 1)
    # Input order must not matter, only score order.
    assert match_detections(gt, dets[::-1], np.array([0.8, 0.9])) == (1, 1, 1)
    # det2' (0.8): IoU A = 85/115 = 0.739 (taken), B = 75/125 = 0.6 -> falls back to the unmatched B (COCO rule).
    dets2 = np.array([[1, 0, 11, 10], [1.5, 0, 11.5, 10]], dtype=np.float64)
    assert match_detections(gt, dets2, np.array([0.9, 0.8])) == (2, 0, 0)
    assert match_detections(gt, np.zeros((0, 4)), np.zeros(0)) == (0, 0, 2)
    assert match_detections(np.zeros((0, 4)), dets, np.array([0.9, 0.8])) == (0, 2, 0)


def test_operating_point_through_evaluate() -> None:
    records = [_record(1, [[0, 0, 10, 10], [4, 0, 14, 10]]), _record(2, [])]
    pred = _predictions([[1, 0, 11, 10], [-2, 0, 8, 10], [4, 0, 14, 10]], [0.9, 0.8, 0.1])
    pred_other_class = _predictions([[4, 0, 14, 10]], [0.95])
    pred_other_class[:, 5] = 3  # not a person: ignored everywhere
    report = evaluate_detections(records, {1: np.concatenate([pred, pred_other_class])})
    assert (report["tp"], report["fp"], report["fn"]) == (1, 1, 1)
    assert report["recall"] == 0.5 and report["precision"] == 0.5
    assert report["num_predictions"] == 3 and report["num_predictions_at_conf"] == 2


def test_bad_input_is_rejected(records: list[ImageRecord]) -> None:
    with pytest.raises(ValueError, match="not in records"):
        evaluate_detections(records, {99: _predictions([[0, 0, 1, 1]], [0.5])})
    with pytest.raises(ValueError, match=r"\(P, 6\)"):
        evaluate_detections(records, {1: np.zeros((2, 5))})
    with pytest.raises(ValueError, match="duplicate"):
        evaluate_detections([records[0], records[0]], {})


def test_write_report_round_trip(tmp_path) -> None:
    report = {"AP": 0.5, "AP_small": None, "tp": np.int64(3), "recall": np.float32(0.25), "odd": float("nan")}
    path = tmp_path / "sub" / "report.json"
    write_report(report, path, extra={"command": "python -m x", "versions": {"numpy": np.__version__}})
    loaded = json.loads(path.read_text())
    assert loaded == {
        "AP": 0.5,
        "AP_small": None,
        "tp": 3,
        "recall": 0.25,
        "odd": None,
        "command": "python -m x",
        "versions": {"numpy": np.__version__},
    }
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temporary file left behind
    with pytest.raises(ValueError, match="clash"):
        write_report(report, path, extra={"AP": 1.0})


def test_segm_metrics_from_polygons_and_predicted_rle():
    from sidnet.data.masks import encode_masks
    from sidnet.data.records import make_record

    square = np.array([[10, 10], [40, 10], [40, 50], [10, 50]], dtype=np.float32)
    record = make_record(path="x.jpg", width=64, height=64, boxes=[[10, 10, 40, 50]], labels=[0], image_id=1,
                         polygons=[(square,)])  # fmt: skip
    perfect = np.zeros((1, 64, 64), dtype=bool)
    perfect[0, 10:50, 10:40] = True
    half = perfect.copy()
    half[0, 30:50] = False
    preds = {1: np.array([[10, 10, 40, 50, 0.9, 0]], dtype=np.float32)}
    report = evaluate_detections([record], preds, masks={1: encode_masks(perfect)})
    assert report["AP50"] == pytest.approx(1.0) and report["segm_AP50"] == pytest.approx(1.0)
    report = evaluate_detections([record], preds, masks={1: encode_masks(half)})  # mask IoU 0.5: boxes still perfect
    assert report["AP"] == pytest.approx(1.0) and report["segm_AP75"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="row for row"):
        evaluate_detections([record], preds, masks={1: []})


def test_pr_curve_and_pictures_beside_the_report(records: list[ImageRecord], tmp_path) -> None:
    """The report carries COCOeval's IoU-0.5 precision-recall curve; sidnet.plots draws it and annotated images."""
    from PIL import Image

    from sidnet.plots import annotated_images, pr_curve_png

    # Half the truth found with high scores, plus one false positive per image at a lower score.
    predictions = {}
    for r in records:
        rows = [[*b, 0.9, 0] for b in r.boxes.tolist()[:2]] + [[600, 400, 630, 470, 0.5, 0]]
        predictions[r.image_id] = np.asarray(rows, np.float32)
    report = evaluate_detections(records, predictions)
    curve = report["pr_curve"]
    assert curve["iou"] == 0.5 and len(curve["recall"]) == len(curve["precision"]) == 101
    reached = [p for p in curve["precision"] if p is not None]
    assert len(reached) == 67 and reached[0] == 1.0  # 10 of 15 boxes found: recall 0..0.66 reached, no further
    assert curve["score"][0] == pytest.approx(0.9)
    png = pr_curve_png(report, tmp_path / "report_pr.png")
    img = np.asarray(Image.open(png))
    assert img.shape == (480, 640, 3) and (img[..., 2] > 150).any() and (img[..., 0] < 100).any()  # a blue curve

    for r in records:  # real files for the annotated images
        Image.new("RGB", (r.width, r.height), (90, 90, 90)).save(tmp_path / f"{r.image_id}.jpg")
    recs = [make_record(path=str(tmp_path / f"{r.image_id}.jpg"), width=r.width, height=r.height,
                        boxes=r.boxes.tolist(), labels=[0] * len(r.boxes), image_id=r.image_id)
            for r in records]  # fmt: skip
    out = annotated_images(recs, predictions, tmp_path / "images", conf=0.3, count=3)
    assert [p.name for p in out] == ["1.jpg", "2.jpg", "3.jpg"]
    drawn = np.asarray(Image.open(out[0]))
    assert (drawn[..., 1] > 150).sum() > 100 and (drawn[..., 0] > 150).sum() > 100  # green truth, red predictions


def test_evaluate_a_checkpoint_at_another_input_size(tiny_checkpoint, tmp_path):
    """``python -m train.evaluate --size N``: the same weights at another input side, recorded in the report beside the
    trained one; a size the network cannot take and ``--onnx --size`` are refused in one line before any work."""
    from pathlib import Path

    from train.evaluate import main

    root = Path(__file__).resolve().parents[1]
    common = ["--checkpoint", str(tiny_checkpoint), "--data", str(root / "conf/data/sample.yaml"), "--device", "cpu",
              "--images", "0", "-q", "--json"]  # fmt: skip
    trained = main([*common, "--out", str(tmp_path / "trained.json")])
    bigger = main([*common, "--size", "192", "--out", str(tmp_path / "bigger.json")])
    saved = json.loads((tmp_path / "bigger.json").read_text())
    assert saved["input_size"] == 192 and saved["trained_input_size"] == 128
    assert json.loads((tmp_path / "trained.json").read_text())["input_size"] == 128
    assert bigger["num_images"] == trained["num_images"]
    assert bigger["num_predictions"] != trained["num_predictions"]  # (192/32)² cells, not (128/32)²: another network
    onnx_with_size = ["--onnx", "m.onnx", "--data", "x.yaml", "--size", "160"]
    for argv, message in ((["--size", "150"], "input size 150 (--size) must be a multiple of 32"),
                          (onnx_with_size, "--size applies to --checkpoint")):
        with pytest.raises(SystemExit) as refused:  # the one line the process prints (OneLineParser)
            main(argv if argv[0] == "--onnx" else [*common, *argv])
        assert message in str(refused.value.code) and "\n" not in str(refused.value.code)
