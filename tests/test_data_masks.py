"""Instance masks: COCO polygons and RLE, YOLO-seg polygons, one-line errors for degenerate or out-of-image masks
(lenient mode counts them), and mask-aware augmentation that keeps masks and boxes consistent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from sidnet.data import DataError, DetectionDataset, build_train_transform, read_coco, read_yolo
from sidnet.data.masks import boxes_from_masks, record_masks


def test_coco_polygons_and_rle_become_masks(coco_dataset):
    rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((10, 8), np.uint8), ((5, 33), (30, 26)))))
    rle = {"size": [48, 64], "counts": rle["counts"].decode()}
    json_path, images = coco_dataset([
        {"bbox": [2, 2, 10, 10], "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]},
        {"bbox": [30, 5, 8, 10], "segmentation": rle},
    ])  # fmt: skip
    records, report = read_coco(annotations=json_path, images=images, masks=True)
    masks = record_masks(records[0])
    assert masks.shape == (2, 48, 64) and report.total == 0
    assert masks[0].sum() == 100 and masks[1].sum() == 80
    np.testing.assert_array_equal(boxes_from_masks(masks), [[2, 2, 12, 12], [30, 5, 38, 15]])


@pytest.mark.parametrize(("segmentation", "message"), [
    ([[2, 2, 12, 2, 22, 2]], "degenerate mask polygon"),  # collinear: no area
    ([[2, 2, 12, 2]], "degenerate mask polygon"),  # < 3 points
    ([[2, 2, 12, 2, 12, 90, 2, 12]], "outside the 64x48 image"),
    ({"size": [40, 64], "counts": "abc"}, "does not match the 64x48 image"),
])  # fmt: skip
def test_bad_masks_are_one_line_errors_or_counted_skips(coco_dataset, segmentation, message):
    json_path, images = coco_dataset([{"bbox": [2, 2, 10, 10], "segmentation": segmentation}])
    with pytest.raises(DataError, match=message) as err:
        read_coco(annotations=json_path, images=images, masks=True)
    assert "\n" not in str(err.value) and "annotation id 1" in str(err.value) and "data.lenient=true" in str(err.value)
    records, report = read_coco(annotations=json_path, images=images, masks=True, lenient=True)
    assert report.total == 1 and len(records[0].boxes) == 0
    records, _ = read_coco(annotations=json_path, images=images)  # boxes only: masks are not checked
    assert len(records[0].boxes) == 1


def test_yolo_seg_polygons_with_degenerate_line(yolo_dataset):
    images, labels = yolo_dataset({"a": "1 0.1 0.1 0.5 0.1 0.5 0.5 0.1 0.5\n1 0.1 0.1 0.2 0.2 0.3 0.3"})
    with pytest.raises(DataError, match=r"degenerate mask polygon .* line 2"):
        read_yolo(images=images, labels=labels, class_map={1: 0}, num_label_classes=91, polygons=True, masks=True)
    records, report = read_yolo(images=images, labels=labels, class_map={1: 0}, num_label_classes=91, polygons=True,
                                masks=True, lenient=True)  # fmt: skip
    assert report.counts == {"degenerate_mask": 1} and len(records[0].boxes) == 1
    assert record_masks(records[0])[0].sum() > 0
    with pytest.raises(DataError, match="polygons=true"):
        read_yolo(images=images, labels=labels, class_map={1: 0}, num_label_classes=91, masks=True)


def test_mask_aware_augmentation_keeps_masks_and_boxes_consistent(shared_data):
    root = shared_data / "coco128"
    records, _ = read_coco(annotations=root / "annotations/instances_train2017.json", images=root / "images/train2017",
                           masks=True)  # fmt: skip
    records = [r for r in records if len(r.boxes)][:6]
    dataset = DetectionDataset(records, size=160, transform=build_train_transform(size=160, masks=True), masks=True)
    plain = DetectionDataset(records, size=160, masks=True)
    seen = 0
    for seed in range(3):
        for i in range(len(records)):
            image, target = dataset[(i, seed)]
            masks, boxes = target["masks"], target["boxes"]
            assert masks.shape == (len(boxes), 160, 160) and masks.dtype == torch.uint8
            assert len(target["labels"]) == len(boxes)
            assert all(m.any() for m in masks)  # an instance whose mask left the image is dropped with its box
            np.testing.assert_array_equal(boxes.numpy(), boxes_from_masks(masks.numpy()))
            seen += len(boxes)
    assert seen > 0
    # Without augmentation the letterboxed masks sit inside their letterboxed boxes.
    _, target = plain[0]
    extents = boxes_from_masks(target["masks"].numpy())
    assert (extents[:, :2] >= target["boxes"][:, :2].numpy() - 1.5).all()
    assert (extents[:, 2:] <= target["boxes"][:, 2:].numpy() + 1.5).all()


def test_horizontal_flip_moves_mask_with_image(shared_data):
    root = shared_data / "coco128"
    records, _ = read_coco(annotations=root / "annotations/instances_train2017.json", images=root / "images/train2017",
                           masks=True)  # fmt: skip
    record = next(r for r in records if len(r.boxes))
    flip = build_train_transform(size=128, masks=True, flip_p=1.0, scale=(1.0, 1.0), translate=0.0, brightness=0.0,
                                 contrast=0.0, hue=0.0, saturation=0.0, value=0.0, blur_p=0.0, noise_p=0.0, gray_p=0.0,
                                 lowlight_p=0.0)  # fmt: skip
    image, target = DetectionDataset([record], size=128, transform=flip, masks=True)[(0, 0)]
    base_image, base = DetectionDataset([record], size=128, masks=True)[0]
    assert torch.equal(image, base_image.flip(-1))
    kept = [int(np.argmax([(m == bm.flip(-1)).all() for bm in base["masks"]])) for m in target["masks"]]
    for m, k in zip(target["masks"], kept, strict=True):
        assert torch.equal(m, base["masks"][k].flip(-1))
