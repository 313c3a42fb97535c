"""Letterbox round trip and box/pixel alignment under the train augmentation."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from sidnet.data import build_train_transform, letterbox, unletterbox_boxes
from sidnet.data.transforms import LETTERBOX_FILL


@pytest.mark.parametrize("hw", [(48, 64), (64, 48), (50, 50), (37, 101)])
def test_letterbox_round_trip(hw: tuple[int, int]) -> None:
    h, w = hw
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    x1, y1 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
    boxes = np.array([[x1, y1, x1 + w / 3, y1 + h / 3], [0, 0, w, h]], dtype=np.float32)
    out, lb_boxes, info = letterbox(image, boxes, size=32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert info.scale == pytest.approx(32 / max(h, w)) and (info.orig_h, info.orig_w) == (h, w)
    # padding is centred and uses the fill value
    assert info.pad_x == (32 - round(w * info.scale)) // 2 and info.pad_y == (32 - round(h * info.scale)) // 2
    if info.pad_y:
        assert (out[0] == LETTERBOX_FILL).all()
    if info.pad_x:
        assert (out[:, 0] == LETTERBOX_FILL).all()
    assert lb_boxes.dtype == np.float32 and lb_boxes.min() >= 0 and lb_boxes.max() <= 32 + 1e-4
    np.testing.assert_allclose(unletterbox_boxes(lb_boxes, info), boxes, atol=1e-3)
    back = unletterbox_boxes(torch.from_numpy(lb_boxes), info)
    assert isinstance(back, torch.Tensor)
    np.testing.assert_allclose(back.numpy(), boxes, atol=1e-3)


def test_unletterbox_clips_to_original() -> None:
    _, _, info = letterbox(np.zeros((50, 100, 3), np.uint8), np.zeros((0, 4)), size=100)
    out = unletterbox_boxes(np.array([[-10, 0, 120, 100]], np.float32), info)
    np.testing.assert_allclose(out, [[0, 0, 100, 50]])


def test_letterbox_empty_boxes() -> None:
    _, boxes, _ = letterbox(np.zeros((10, 20, 3), np.uint8), np.zeros((0, 4)), size=16)
    assert boxes.shape == (0, 4) and boxes.dtype == np.float32


def test_albumentations_update_check_disabled() -> None:
    assert os.environ.get("NO_ALBUMENTATIONS_UPDATE") == "1"


def test_disabled_transform_is_none() -> None:
    assert build_train_transform(size=64, enabled=False) is None
    identity = {"flip_p": 0, "scale": (1.0, 1.0), "translate": 0, "brightness": 0, "contrast": 0, "hue": 0}
    identity |= {"saturation": 0, "value": 0, "blur_p": 0, "noise_p": 0, "gray_p": 0, "lowlight_p": 0}
    assert build_train_transform(size=64, **identity) is None


def _white_rectangle(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    image = np.zeros((60, 90, 3), np.uint8)
    image[10:40, 50:80] = 255
    lb_image, boxes, _ = letterbox(image, np.array([[50, 10, 80, 40]], np.float32), size=size)
    return lb_image, boxes


def test_geometric_aug_keeps_boxes_aligned() -> None:
    """The box after flip/zoom/shift still tightly covers the white pixels (up to interpolation blur)."""
    transform = build_train_transform(
        size=96, flip_p=0.5, scale=(0.5, 1.5), translate=0.3, brightness=0, contrast=0, hue=0, saturation=0,
        value=0, blur_p=0, noise_p=0, gray_p=0, lowlight_p=0, min_visibility=0.3,
    )  # fmt: skip
    transform.set_random_state(np.random.default_rng(0), random.Random(0))  # see DetectionDataset._reseed
    image, boxes = _white_rectangle()
    kept = flipped = 0
    for _ in range(40):
        out = transform(image=image, bboxes=boxes, labels=np.array([0]))
        assert len(out["bboxes"]) == len(out["labels"])
        white = np.argwhere(out["image"][..., 0] > 200)
        if not len(out["bboxes"]):
            continue
        kept += 1
        x1, y1, x2, y2 = out["bboxes"][0]
        assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96
        (wy1, wx1), (wy2, wx2) = white.min(0), white.max(0) + 1
        np.testing.assert_allclose([x1, y1, x2, y2], [wx1, wy1, wx2, wy2], atol=2.0)
        flipped += (x1 + x2) / 2 < 48  # the rectangle starts right of centre; left of it means a flip happened
    assert kept >= 20 and 0 < flipped < kept


def test_full_aug_boxes_stay_inside() -> None:
    transform = build_train_transform(size=96)
    transform.set_random_state(np.random.default_rng(1), random.Random(1))
    image, boxes = _white_rectangle()
    boxes = np.concatenate([boxes, [[0, 20, 10, 60]]]).astype(np.float32)  # one box on the left border
    for _ in range(40):
        out = transform(image=image, bboxes=boxes, labels=np.array([0, 0]))
        assert out["image"].shape == (96, 96, 3) and out["image"].dtype == np.uint8
        b = np.asarray(out["bboxes"]).reshape(-1, 4)
        assert len(b) == len(out["labels"])
        assert (b >= 0).all() and (b <= 96).all() and (b[:, 2:] > b[:, :2]).all()
