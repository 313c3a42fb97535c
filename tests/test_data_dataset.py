"""DetectionDataset items, collate, negative selection, and images that break after the up-front check."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sidnet.data import (
    DataError,
    DetectionDataset,
    ImageRecord,
    LetterboxInfo,
    build_train_transform,
    collate,
    read_yolo,
    sample_root,
    select_negatives,
)


@pytest.fixture
def sample_records() -> list[ImageRecord]:
    records, _ = read_yolo(images=sample_root() / "images/train2017", labels=sample_root() / "labels/boxes/train2017")
    return records


@pytest.mark.parametrize("augment", [False, True])
def test_item_contract(sample_records: list[ImageRecord], augment: bool) -> None:
    transform = build_train_transform(size=128) if augment else None
    ds = DetectionDataset(sample_records, size=128, transform=transform)
    assert len(ds) == 8
    for i in range(len(ds)):
        image, target = ds[i]
        rec = sample_records[i]
        assert image.shape == (3, 128, 128) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        boxes, labels = target["boxes"], target["labels"]
        assert boxes.dtype == torch.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
        assert labels.dtype == torch.int64 and labels.shape == (len(boxes),)
        assert (boxes >= 0).all() and (boxes <= 128).all()
        assert target["image_id"] == rec.image_id and target["orig_size"] == (rec.height, rec.width)
        assert isinstance(target["letterbox"], LetterboxInfo)
        if not augment:
            assert len(boxes) == len(rec.boxes)
            info = target["letterbox"]
            np.testing.assert_allclose(boxes.numpy(), rec.boxes * info.scale + [info.pad_x, info.pad_y] * 2, atol=1e-4)


def test_rgb_order(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "images/red.png")
    records, _ = read_yolo(images=tmp_path / "images", labels=tmp_path / "labels")
    image, _ = DetectionDataset(records, size=20)[0]
    assert image[:, 10, 10].tolist() == [1.0, 0.0, 0.0]


def test_collate(sample_records: list[ImageRecord]) -> None:
    ds = DetectionDataset(sample_records, size=64)
    images, targets = collate([ds[0], ds[1], ds[7]])
    assert images.shape == (3, 3, 64, 64) and isinstance(targets, list) and len(targets) == 3


def test_augmentation_follows_torch_seed(sample_records: list[ImageRecord]) -> None:
    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        ds = DetectionDataset(sample_records[:1], size=64, transform=build_train_transform(size=64))
        return torch.stack([ds[0][0] for _ in range(3)])

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # successive draws differ


def test_workers_get_different_augmentations(sample_records: list[ImageRecord]) -> None:
    ds = DetectionDataset([sample_records[0]] * 4, size=64, transform=build_train_transform(size=64))
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
    first, second = (images for images, _ in loader)  # batch 0 from worker 0, batch 1 from worker 1
    assert not torch.equal(first, second)


def _error_from_worker(dataset: DetectionDataset) -> str:
    it = iter(DataLoader(dataset, batch_size=2, num_workers=1, collate_fn=collate))
    try:
        next(it)
    except DataError as err:
        return str(err)
    finally:
        # An iterator that re-raised sits in a reference cycle; left to the GC its shutdown stalls ~5 s (torch's
        # worker status interval), which would land on whichever test runs next.
        getattr(it, "_shutdown_workers", lambda: None)()
    raise AssertionError("no DataError from the worker")


def test_image_breaking_after_check(tmp_path: Path, yolo_dataset, caplog: pytest.LogCaptureFixture) -> None:
    images, labels = yolo_dataset({"a": "0 0.5 0.5 0.2 0.2", "b": "0 0.5 0.5 0.2 0.2"})
    records, _ = read_yolo(images=images, labels=labels)
    (images / "a.jpg").write_bytes(b"corrupted after validation")
    with pytest.raises(DataError) as err:
        DetectionDataset(records, size=32)[0]
    assert "a.jpg" in str(err.value) and "\n" not in str(err.value)
    message = _error_from_worker(DetectionDataset(records, size=32))  # re-raised by torch: still the one line
    assert message.startswith("image failed to decode during training:") and "a.jpg" in message
    with caplog.at_level(logging.WARNING, logger="sidnet.data"):
        image, target = DetectionDataset(records, size=32, lenient=True)[0]
    assert target["image_id"] == records[1].image_id and "a.jpg" in caplog.text
    # a replaced file of a different size would misplace every box
    from PIL import Image

    Image.new("RGB", (10, 10)).save(images / "a.jpg")
    with pytest.raises(DataError, match="a.jpg is 10x10"):
        DetectionDataset(records, size=32)[0]


def test_select_negatives() -> None:
    box = np.array([[0, 0, 1, 1]], np.float32)
    records = [ImageRecord(Path(f"{i}.jpg"), 2, 2, box if i < 10 else box[:0], np.zeros(int(i < 10), np.int64), i)
               for i in range(30)]  # fmt: skip
    picked = select_negatives(records, negative_ratio=0.5, seed=3)
    assert sum(not r.is_negative for r in picked) == 10 and sum(r.is_negative for r in picked) == 5
    assert [r.image_id for r in picked] == [r.image_id for r in select_negatives(records, negative_ratio=0.5, seed=3)]
    other = select_negatives(records, negative_ratio=0.5, seed=4)
    assert [r.image_id for r in picked] != [r.image_id for r in other]
    assert [r.image_id for r in picked] == sorted(r.image_id for r in picked)  # order preserved
    assert len(select_negatives(records, negative_ratio=-1, seed=0)) == 30
    assert len(select_negatives(records, negative_ratio=10, seed=0)) == 30  # capped at what exists
    assert len(select_negatives(records, negative_ratio=0, seed=0)) == 10


def test_mosaic_keeps_boxes_on_their_people():
    """A mosaic of synthetic images whose only bright pixels are the boxes: every output box still covers white."""
    import numpy as np

    from sidnet.data import DetectionDataset, ImageRecord, build_train_transform

    def record(tmp, i):
        import cv2

        img = np.zeros((200, 300, 3), np.uint8)
        box = np.float32([[40 + 10 * i, 30, 120 + 10 * i, 170]])
        img[30:170, 40 + 10 * i : 120 + 10 * i] = 255
        path = tmp / f"m{i}.png"
        cv2.imwrite(str(path), img)
        return ImageRecord(path=path, width=300, height=200, boxes=box, labels=np.zeros(1, np.int64), image_id=i)

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        records = [record(Path(d), i) for i in range(4)]
        transform = build_train_transform(size=128, enabled=False) or _identity_transform()
        ds = DetectionDataset(records, size=128, transform=transform, mosaic=1.0)
        for i in range(8):
            image, target = ds[i % 4]
            assert image.shape == (3, 128, 128)
            for x1, y1, x2, y2 in target["boxes"].round().int().tolist():
                patch = image[:, y1:y2, x1:x2]
                assert patch.numel() and patch.mean() > 0.8  # the box sits on its white person
            assert (target["boxes"][:, 2:] <= 128).all() and (target["boxes"][:, :2] >= 0).all()


def _identity_transform():
    import albumentations as A

    return A.Compose([A.NoOp()], bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"]))


def test_seeded_sampler_makes_samples_independent_of_history():
    import torch

    from sidnet.data import DetectionDataset, SeededSampler, build_train_transform, load_split, sample_root

    records, _ = load_split(
        format="yolo", root=sample_root(), images="images/train2017", labels="labels/boxes/train2017"
    )
    ds = DetectionDataset(records, size=128, transform=build_train_transform(size=128), mosaic=0.5)
    sampler = SeededSampler(len(ds), seed=3)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) != epoch1
    sampler.set_epoch(1)
    assert list(sampler) == epoch1
    first = [ds[k][0] for k in epoch1[:3]]
    for k in epoch1[3:]:  # other samples in between change no later result
        ds[k]
    again = [ds[k][0] for k in epoch1[:3]]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    i, seed = epoch1[0]
    assert not torch.equal(ds[(i, seed)][0], ds[(i, seed + 1)][0])
