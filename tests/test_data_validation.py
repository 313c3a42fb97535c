"""Bad input: every case raises a one-line DataError naming the file (strict) or is skipped and counted (lenient)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from sidnet.data import DataError, read_coco, read_yolo
from sidnet.data.errors import SkipReport

# name -> (labels per image stem, reason, file that the message must name)
YOLO_CASES = {
    "box_outside": ({"a": "0 0.9 0.5 0.5 0.5"}, "box_outside_image", "a.txt"),
    "negative_box": ({"a": "0 0.5 0.5 -0.1 0.2"}, "empty_box", "a.txt"),
    "zero_area": ({"a": "0 0.5 0.5 0.0 0.2"}, "empty_box", "a.txt"),
    "class_too_big": ({"a": "80 0.5 0.5 0.2 0.2"}, "unknown_class", "a.txt"),
    "class_negative": ({"a": "-1 0.5 0.5 0.2 0.2"}, "unknown_class", "a.txt"),
    "too_few_fields": ({"a": "0 0.5 0.5 0.2"}, "malformed_label", "a.txt"),
    "not_a_number": ({"a": "0 0.5 0.5 abc 0.2"}, "malformed_label", "a.txt"),
    "fractional_class": ({"a": "0.5 0.5 0.5 0.2 0.2"}, "malformed_label", "a.txt"),
}


def _one_line(err: pytest.ExceptionInfo, name: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg and name in msg and "data.lenient=true" in msg, msg


@pytest.mark.parametrize("case", sorted(YOLO_CASES))
def test_yolo_bad_labels(yolo_dataset, case: str) -> None:
    labels, reason, name = YOLO_CASES[case]
    good = "0 0.5 0.5 0.2 0.2"
    images, labels_dir = yolo_dataset({stem: f"{good}\n{text}" for stem, text in labels.items()})
    with pytest.raises(DataError) as err:
        read_yolo(images=images, labels=labels_dir)
    _one_line(err, name)
    records, report = read_yolo(images=images, labels=labels_dir, lenient=True)
    assert report.counts == {reason: 1}, report
    assert len(records) == 1 and len(records[0].boxes) == 1  # only the bad line is dropped
    assert reason in str(report) and "\n" not in str(report)


def test_yolo_box_within_tolerance_is_clipped(yolo_dataset) -> None:
    # 64 px wide image, w = 0.5: cx = 0.75 + 0.5/64 puts the right edge at 64.5 px, inside the 1 px tolerance
    images, labels = yolo_dataset({"a": f"0 {0.75 + 0.5 / 64:.6f} 0.5 0.5 0.5"})
    records, report = read_yolo(images=images, labels=labels)
    assert report.total == 0
    assert records[0].boxes[0, 2] == pytest.approx(64.0)


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated"])
def test_yolo_corrupt_image(yolo_dataset, kind: str) -> None:
    images, labels = yolo_dataset({"a": "0 0.5 0.5 0.2 0.2", "b": "0 0.5 0.5 0.2 0.2"})
    bad = images / "b.jpg"
    data = bad.read_bytes()
    bad.write_bytes({"garbage": b"this is not a jpeg", "empty": b"", "truncated": data[: len(data) // 2]}[kind])
    with pytest.raises(DataError) as err:
        read_yolo(images=images, labels=labels)
    _one_line(err, "b.jpg")
    records, report = read_yolo(images=images, labels=labels, lenient=True)
    assert [r.path.name for r in records] == ["a.jpg"] and report.counts == {"corrupt_image": 1}


def test_yolo_orphan_label_counted_not_raised(yolo_dataset) -> None:
    images, labels = yolo_dataset({"a": "0 0.5 0.5 0.2 0.2"})
    (labels / "ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    records, report = read_yolo(images=images, labels=labels)
    assert len(records) == 1 and report.counts == {"orphan_label": 1}


def test_yolo_wrong_label_folder(yolo_dataset) -> None:
    images, labels = yolo_dataset({"a": None})
    (labels / "other.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match="no label file .* matches an image"):
        read_yolo(images=images, labels=labels)


def test_yolo_bad_class_map(yolo_dataset) -> None:
    images, labels = yolo_dataset({"a": None})
    with pytest.raises(DataError, match="data.class_map"):
        read_yolo(images=images, labels=labels, class_map={80: 0})


COCO_CASES = {
    "box_outside": ({"bbox": [50, 10, 20, 10]}, "box_outside_image", "instances.json"),
    "zero_area": ({"bbox": [5, 5, 0, 10]}, "empty_box", "instances.json"),
    "negative_box": ({"bbox": [5, 5, 10, -3]}, "empty_box", "instances.json"),
    "unknown_category": ({"bbox": [5, 5, 10, 10], "category_id": 99}, "unknown_class", "instances.json"),
    "malformed_bbox": ({"bbox": [5, 5, 10]}, "malformed_label", "instances.json"),
    "bbox_not_numbers": ({"bbox": [5, 5, "x", 10]}, "malformed_label", "instances.json"),
    "unknown_image": ({"bbox": [5, 5, 10, 10], "image_id": 42}, "malformed_label", "instances.json"),
}


@pytest.mark.parametrize("case", sorted(COCO_CASES))
def test_coco_bad_annotations(coco_dataset, case: str) -> None:
    bad, reason, name = COCO_CASES[case]
    ann, images = coco_dataset([{"bbox": [1, 1, 10, 10]}, bad])
    with pytest.raises(DataError) as err:
        read_coco(annotations=ann, images=images)
    _one_line(err, name)
    records, report = read_coco(annotations=ann, images=images, lenient=True)
    assert report.counts == {reason: 1}
    assert len(records) == 2 and len(records[0].boxes) == 1


def test_coco_missing_image(coco_dataset) -> None:
    ann, images = coco_dataset([{"bbox": [1, 1, 10, 10]}])
    (images / "img1.jpg").unlink()
    with pytest.raises(DataError) as err:
        read_coco(annotations=ann, images=images)
    _one_line(err, "img1.jpg")
    assert "listed in" in str(err.value) and "instances.json" in str(err.value)
    records, report = read_coco(annotations=ann, images=images, lenient=True)
    assert [r.path.name for r in records] == ["img0.jpg"] and report.counts == {"missing_image": 1}


def test_coco_corrupt_image(coco_dataset) -> None:
    ann, images = coco_dataset([{"bbox": [1, 1, 10, 10]}])
    (images / "img0.jpg").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError) as err:
        read_coco(annotations=ann, images=images)
    _one_line(err, "img0.jpg")
    records, report = read_coco(annotations=ann, images=images, lenient=True)
    assert [r.path.name for r in records] == ["img1.jpg"] and report.counts == {"corrupt_image": 1}


def test_coco_size_mismatch(coco_dataset) -> None:
    ann, images = coco_dataset([{"bbox": [1, 1, 10, 10]}])
    Image.new("RGB", (32, 48)).save(images / "img0.jpg")  # the JSON says 64x48
    with pytest.raises(DataError) as err:
        read_coco(annotations=ann, images=images)
    _one_line(err, "img0.jpg")


def test_coco_bad_json(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    bad = tmp_path / "instances.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="invalid COCO JSON") as err:
        read_coco(annotations=bad, images=tmp_path / "images")
    assert "\n" not in str(err.value)
    bad.write_text("[]")
    with pytest.raises(DataError, match="not a COCO instances file"):
        read_coco(annotations=bad, images=tmp_path / "images")
    with pytest.raises(DataError, match="COCO annotations not found"):
        read_coco(annotations=tmp_path / "missing.json", images=tmp_path / "images")


def test_skip_report_logs_once_per_reason(caplog: pytest.LogCaptureFixture) -> None:
    report = SkipReport()
    with caplog.at_level(logging.WARNING, logger="sidnet.data"):
        for i in range(5):
            report.add("empty_box", f"bad box {i}")
        report.add("corrupt_image", "bad image")
    assert len(caplog.records) == 2
    assert report.total == 6 and len(report.examples["empty_box"]) == 3
    assert str(report) == "skipped 6: corrupt_image=1, empty_box=5"
    assert str(SkipReport()) == "nothing skipped"
    merged = SkipReport().merge(report).merge(report)
    assert merged.counts == {"empty_box": 10, "corrupt_image": 2}


def test_data_error_is_one_line() -> None:
    assert str(DataError("a\nb  c")) == "a b c"
    assert isinstance(DataError("x"), ValueError)
