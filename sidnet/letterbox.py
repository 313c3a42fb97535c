"""Letterbox and its inverse: the one implementation that training, evaluation and every runtime share.

Torch-free (numpy + OpenCV), so the TensorRT runtime path can use it without importing torch;
:func:`unletterbox_boxes` also accepts torch tensors (any device) and returns the same type.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

LETTERBOX_FILL = 114  # YOLO convention: mid-grey padding keeps padded borders near the data mean


@dataclass(frozen=True)
class LetterboxInfo:
    """How an ``orig_h x orig_w`` image was placed into the square network input.

    network_xy = original_xy * scale + (pad_x, pad_y); the resized content is ``round(orig * scale)`` pixels.
    """

    scale: float
    pad_x: int
    pad_y: int
    orig_h: int
    orig_w: int


def letterbox(
    image: np.ndarray, boxes: np.ndarray, *, size: int, fill: int = LETTERBOX_FILL
) -> tuple[np.ndarray, np.ndarray, LetterboxInfo]:
    """Resize keeping the aspect ratio (``scale = size / max(h, w)``, bilinear) and pad centred to a square.

    Args:
        image: ``(H, W, 3)`` uint8.
        boxes: ``(K, 4)`` xyxy in original pixels (any float dtype).

    Returns:
        ``(size, size, 3)`` uint8 image, ``(K, 4)`` float32 boxes in network-input pixels, and the
        :class:`LetterboxInfo` that :func:`unletterbox_boxes` inverts.
    """
    h, w = image.shape[:2]
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    out = np.full((size, size, image.shape[2]), fill, dtype=np.uint8)
    out[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = image
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * scale
    boxes += np.array([pad_x, pad_y, pad_x, pad_y], dtype=np.float32)
    return out, boxes, LetterboxInfo(scale=scale, pad_x=pad_x, pad_y=pad_y, orig_h=h, orig_w=w)


def unletterbox_boxes(boxes, info: LetterboxInfo):
    """Map ``(K, 4)`` xyxy boxes from network-input pixels back to original pixels, clipped to the original image.

    Works on numpy arrays and torch tensors (any device); returns the same type, a new object.
    """
    pad = [info.pad_x, info.pad_y, info.pad_x, info.pad_y]
    hi = [info.orig_w, info.orig_h, info.orig_w, info.orig_h]
    if _is_torch(boxes):
        out = (boxes - boxes.new_tensor(pad)) / info.scale
        return out.clamp(min=0).minimum(out.new_tensor(hi))
    out = (np.asarray(boxes, dtype=np.float32) - np.float32(pad)) / np.float32(info.scale)
    return np.minimum(np.maximum(out, 0), np.float32(hi)).astype(np.float32)


def _is_torch(x: object) -> bool:
    return type(x).__module__.startswith("torch")  # no torch import: a tensor can only exist if torch is loaded
