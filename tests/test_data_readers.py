"""Readers on the real coco128 data, the bundled sample, and small synthetic sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from sidnet.data import DataError, dataset_summary, load_split, read_coco, read_yolo, sample_root

REPO = Path(__file__).resolve().parents[1]


def _check_records(records) -> None:
    for r in records:
        assert r.boxes.dtype == np.float32 and r.boxes.shape == (len(r.labels), 4)
        assert r.labels.dtype == np.int64
        if len(r.boxes):
            assert (r.boxes[:, 2] > r.boxes[:, 0]).all() and (r.boxes[:, 3] > r.boxes[:, 1]).all()
            assert (
                r.boxes.min() >= 0 and (r.boxes[:, [0, 2]] <= r.width).all() and (r.boxes[:, [1, 3]] <= r.height).all()
            )


def test_coco_train_counts(shared_data: Path) -> None:
    root = shared_data / "coco128"
    records, report = read_coco(
        annotations=root / "annotations/instances_train2017.json", images=root / "images/train2017"
    )
    _check_records(records)
    assert report.total == 0
    summary = dataset_summary(records)
    assert summary == {"images": 128, "positives": 61, "negatives": 67, "boxes": 254}
    by_stem = {r.path.stem: r for r in records}
    assert by_stem["000000000250"].is_negative and by_stem["000000000508"].is_negative
    assert by_stem["000000000250"].image_id == 250
    # one polygon set per box; crowd annotations (RLE) were dropped, so every kept person has polygons here
    for r in records:
        assert len(r.polygons) == len(r.boxes)
        for polys in r.polygons:
            assert all(p.dtype == np.float32 and p.ndim == 2 and p.shape[1] == 2 for p in polys)


def test_yolo_val_counts(shared_data: Path) -> None:
    root = shared_data / "coco128"
    records, report = read_yolo(images=root / "images/val2017", labels=root / "labels/boxes/val2017")
    _check_records(records)
    assert report.total == 0
    assert dataset_summary(records) == {"images": 128, "positives": 73, "negatives": 55, "boxes": 350}
    assert records[0].polygons == ()


def test_yolo_train_matches_coco_and_counts_orphans(shared_data: Path) -> None:
    root = shared_data / "coco128"
    records, report = read_yolo(images=root / "images/train2017", labels=root / "labels/boxes/train2017")
    assert dataset_summary(records)["boxes"] == 254
    negatives = {r.path.stem for r in records if r.is_negative}
    assert {"000000000250", "000000000508"} <= negatives  # no label file at all -> negative
    assert report.counts == {"orphan_label": 2}  # 000000000656 / 659 have labels but no image


def test_segment_labels_use_panoptic_ids(shared_data: Path) -> None:
    """labels/segments number classes by COCO category id (person = 1), unlike labels/boxes (person = 0)."""
    labels = shared_data / "coco128/labels"
    assert yaml.safe_load((labels / "boxes/classes.yaml").read_text())["names"][0] == "person"
    assert yaml.safe_load((labels / "segments/classes.yaml").read_text())["names"][1] == "person"
    records, _ = read_yolo(
        images=shared_data / "coco128/images/val2017",
        labels=labels / "segments/val2017",
        class_map={1: 0},
        num_label_classes=91,
        polygons=True,
        skip_unlabeled=True,  # the segment labels cover 100 of the 128 images
    )
    assert len(records) == 100
    assert all(len(r.polygons) == len(r.boxes) for r in records)
    r = next(r for r in records if len(r.boxes))
    pts = r.polygons[0][0]
    np.testing.assert_allclose(r.boxes[0], [*pts.min(0), *pts.max(0)], atol=1e-3)


def test_load_split_from_configs(shared_data: Path) -> None:
    cfg = yaml.safe_load((REPO / "conf/data/coco128.yaml").read_text())
    root = shared_data / "coco128"
    common = {k: cfg[k] for k in ("class_names", "class_map", "num_label_classes", "lenient")}
    train, _ = load_split(root=root, **cfg["train"], **common)
    val, _ = load_split(root=root, **cfg["val"], **common)
    assert dataset_summary(train)["boxes"] == 254 and dataset_summary(val)["boxes"] == 350


@pytest.mark.parametrize("config", ["sample.yaml", "starter.yaml"])
def test_sample_loads(config: str) -> None:
    """The bundled sample reads with its own config and with data=starter's splits (the README's first command
    falls back to the sample)."""
    path = REPO / "conf/data" / config
    if not path.is_file():
        pytest.skip(f"{path} not present")
    cfg = yaml.safe_load(path.read_text())
    common = {k: cfg[k] for k in ("class_names", "class_map", "num_label_classes", "lenient")}
    train, report = load_split(root=sample_root(), **cfg["train"], **common)
    val, _ = load_split(root=sample_root(), **cfg["val"], **common)
    assert report.total == 0
    assert dataset_summary(train) == {"images": 8, "positives": 6, "negatives": 2, "boxes": 17}
    assert dataset_summary(val) == {"images": 4, "positives": 3, "negatives": 1, "boxes": 12}
    assert max(max(r.width, r.height) for r in train + val) <= 416
    _check_records(train + val)


def test_sample_files() -> None:
    assert yaml.safe_load((REPO / "conf/data/sample.yaml").read_text())["root"] is None
    size = sum(p.stat().st_size for p in sample_root().rglob("*") if p.is_file())
    assert size < 1.2e6
    attribution = (sample_root() / "ATTRIBUTION.md").read_text()
    assert all(p.name in attribution for p in sample_root().glob("images/*/*.jpg"))


def test_load_split_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown data format 'voc'"):
        load_split(format="voc", root=tmp_path, images="images")
    with pytest.raises(DataError, match="data root not found"):
        load_split(format="yolo", root=tmp_path / "nope", images="images", labels="labels")
    with pytest.raises(DataError, match="needs a labels folder"):
        load_split(format="yolo", root=tmp_path, images="images")
    with pytest.raises(DataError, match="YOLO image folder not found"):
        load_split(format="yolo", root=tmp_path, images="images", labels="labels")


def test_yolo_ids_and_other_classes(yolo_dataset) -> None:
    images, labels = yolo_dataset({"000123": "0 0.5 0.5 0.5 0.5\n5 0.5 0.5 0.2 0.2", "000007": None})
    records, report = read_yolo(images=images, labels=labels)
    assert [r.image_id for r in records] == [7, 123]  # sorted by name, ids from the digits
    assert records[0].is_negative
    assert records[1].labels.tolist() == [0]  # class 5 is another class: dropped, not an error
    np.testing.assert_allclose(records[1].boxes, [[16, 12, 48, 36]])
    assert report.total == 0


def test_yolo_non_digit_stems_enumerate(yolo_dataset) -> None:
    images, labels = yolo_dataset({"b": "0 0.5 0.5 0.5 0.5", "a": "0 0.5 0.5 0.5 0.5", "12": None})
    records, _ = read_yolo(images=images, labels=labels)
    assert [(r.path.stem, r.image_id) for r in records] == [("12", 0), ("a", 1), ("b", 2)]


def test_coco_keeps_only_named_classes(coco_dataset) -> None:
    ann, images = coco_dataset(
        [
            {"bbox": [1, 2, 10, 20], "segmentation": [[1, 2, 11, 2, 11, 22, 1, 22]]},
            {"bbox": [5, 5, 10, 10], "category_id": 2},  # bicycle: not a person, not an error
            {"bbox": [5, 5, 10, 10], "iscrowd": 1, "segmentation": {"counts": "x", "size": [48, 64]}},
            {"bbox": [30, 5, 10, 10], "segmentation": {"counts": "x", "size": [48, 64]}},  # RLE -> no polygon
        ]
    )
    records, report = read_coco(annotations=ann, images=images)
    assert report.total == 0 and len(records) == 2 and records[1].is_negative
    np.testing.assert_allclose(records[0].boxes, [[1, 2, 11, 22], [30, 5, 40, 15]])
    assert len(records[0].polygons[0]) == 1 and records[0].polygons[1] == ()
    two_class, _ = read_coco(annotations=ann, images=images, class_names=("person", "bicycle"))
    assert two_class[0].labels.tolist() == [0, 1, 0]
    with pytest.raises(DataError, match="class names \\['persn'\\]"):
        read_coco(annotations=ann, images=images, class_names=("persn",))
