"""Instance masks: checks, rasterisation (polygons and COCO RLE, via pycocotools), letterbox and its inverse.

A record's mask for box *k* is ``record.polygons[k]`` (a tuple of ``(P, 2)`` absolute-pixel polygons) or, when that is
empty, ``record.rles[k]`` (a COCO RLE dict, compressed or not, of the original image's size).
"""

from __future__ import annotations

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from .errors import DEGENERATE_MASK, LENIENT_HINT, MASK_OUTSIDE_IMAGE
from .records import ImageRecord
from .transforms import LETTERBOX_FILL, LetterboxInfo  # noqa: F401  (re-exported for callers of letterbox_masks)
from .validate import BOX_TOLERANCE_PX, Checker

MIN_MASK_AREA_PX = 1.0  # a polygon set covering less than one pixel is a line or a point, not a person


def polygon_area(points: np.ndarray) -> float:
    """Shoelace area of one ``(P, 2)`` polygon in pixels²."""
    x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def check_polygons(polygons: list[np.ndarray], *, width: int, height: int, checker: Checker, where: str) -> bool:
    """True when the polygons form a usable mask inside the image; otherwise report the problem (one line) and
    return False (lenient) — strict mode raises."""
    tol = BOX_TOLERANCE_PX
    for pts in polygons:
        if (
            (pts[:, 0] < -tol).any()
            or (pts[:, 1] < -tol).any()
            or (pts[:, 0] > width + tol).any()
            or (pts[:, 1] > height + tol).any()
        ):
            lo, hi = pts.min(axis=0), pts.max(axis=0)
            checker.problem(MASK_OUTSIDE_IMAGE, f"mask polygon spans x {lo[0]:.1f}..{hi[0]:.1f}, y {lo[1]:.1f}.."
                            f"{hi[1]:.1f} outside the {width}x{height} image in {where} (tolerance {tol:g} px); "
                            f"fix the polygon, or {LENIENT_HINT}")  # fmt: skip
            return False
    area = sum(polygon_area(p) for p in polygons if len(p) >= 3)
    if area < MIN_MASK_AREA_PX:
        points = [len(p) for p in polygons]
        checker.problem(DEGENERATE_MASK, f"degenerate mask polygon (points per polygon {points}, area {area:.2f} px²) "
                        f"in {where}; it needs >= 3 non-collinear points: fix or delete it, or "
                        f"{LENIENT_HINT}")  # fmt: skip
        return False
    return True


def check_rle(rle: object, *, width: int, height: int, checker: Checker, where: str) -> bool:
    """True for a COCO RLE dict of the image's size with at least one pixel set; else report it (see above)."""
    size = rle.get("size") if isinstance(rle, dict) else None
    if not isinstance(size, (list, tuple)) or "counts" not in rle or list(size) != [height, width]:
        checker.problem(MASK_OUTSIDE_IMAGE, f"RLE mask of size {size} (h, w) does not match the {width}x{height} image "
                        f"in {where}; fix the segmentation, or {LENIENT_HINT}")  # fmt: skip
        return False
    try:
        area = float(mask_utils.area(_compressed(rle)))
    except (TypeError, ValueError) as e:
        checker.problem(DEGENERATE_MASK,
                        f"unreadable RLE mask in {where} ({e}); fix the segmentation, or {LENIENT_HINT}")  # fmt: skip
        return False
    if area < MIN_MASK_AREA_PX:
        checker.problem(DEGENERATE_MASK, f"empty RLE mask in {where}; fix or delete it, or {LENIENT_HINT}")
        return False
    return True


def _compressed(rle: dict) -> dict:
    if isinstance(rle["counts"], list):  # uncompressed (COCO's iscrowd style): counts as a list of run lengths
        h, w = rle["size"]
        return mask_utils.frPyObjects(rle, h, w)
    return {"size": list(rle["size"]), "counts": rle["counts"].encode() if isinstance(rle["counts"], str)
            else rle["counts"]}  # fmt: skip


def record_masks(record: ImageRecord) -> np.ndarray:
    """``(K, H, W)`` uint8 {0, 1} masks of a record's boxes in original pixels (a box without mask data is all zero:
    readers only produce such records when masks were not asked for)."""
    h, w = record.height, record.width
    out = np.zeros((len(record.boxes), h, w), dtype=np.uint8)
    rles = record.rles or (None,) * len(record.boxes)
    polys = record.polygons or ((),) * len(record.boxes)
    for k, (poly, rle) in enumerate(zip(polys, rles, strict=True)):
        if len(poly):
            encoded = mask_utils.frPyObjects([p.astype(np.float64).reshape(-1).tolist() for p in poly], h, w)
            out[k] = mask_utils.decode(mask_utils.merge(encoded))
        elif rle is not None:
            out[k] = mask_utils.decode(_compressed(rle))
    return out


def letterbox_masks(masks: np.ndarray, info: LetterboxInfo, *, size: int) -> np.ndarray:
    """``(K, H, W)`` {0, 1} original-pixel masks → ``(K, size, size)`` in network pixels (the image's letterbox)."""
    out = np.zeros((len(masks), size, size), dtype=np.uint8)
    new_w, new_h = max(1, round(info.orig_w * info.scale)), max(1, round(info.orig_h * info.scale))
    for k, m in enumerate(masks):
        resized = cv2.resize(m * 255, (new_w, new_h), interpolation=cv2.INTER_LINEAR) >= 128
        out[k, info.pad_y : info.pad_y + new_h, info.pad_x : info.pad_x + new_w] = resized
    return out


def unletterbox_masks(masks: np.ndarray, info: LetterboxInfo) -> np.ndarray:
    """``(P, S, S)`` float masks in network pixels → ``(P, orig_h, orig_w)`` float32 (bilinear)."""
    new_w, new_h = max(1, round(info.orig_w * info.scale)), max(1, round(info.orig_h * info.scale))
    out = np.zeros((len(masks), info.orig_h, info.orig_w), dtype=np.float32)
    for k, m in enumerate(masks):
        crop = np.ascontiguousarray(m[info.pad_y : info.pad_y + new_h, info.pad_x : info.pad_x + new_w], np.float32)
        out[k] = cv2.resize(crop, (info.orig_w, info.orig_h), interpolation=cv2.INTER_LINEAR)
    return out


def paste_masks(masks: np.ndarray, boxes: np.ndarray, *, size: int) -> np.ndarray:
    """Per-box mask probabilities ``(P, M, M)`` (an exported Mask R-CNN's ``masks`` rows) + their ``(P, 4)`` xyxy
    boxes in network pixels → ``(P, size, size)`` float32 probabilities, pasted as torchvision's Mask R-CNN does in
    eval mode (``paste_masks_in_image``, one pixel of padding), so an export is scored like its checkpoint."""
    import torch
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    if len(masks) == 0:
        return np.zeros((0, size, size), np.float32)
    pasted = paste_masks_in_image(torch.from_numpy(np.ascontiguousarray(masks, np.float32))[:, None],
                                  torch.from_numpy(np.ascontiguousarray(boxes, np.float32)), (size, size))  # fmt: skip
    return pasted[:, 0].numpy()


def encode_masks(masks: np.ndarray) -> list[dict]:
    """``(P, H, W)`` bool → COCO RLE dicts with ``counts`` as str (JSON-ready)."""
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """``(K, H, W)`` masks → ``(K, 4)`` float32 tight xyxy boxes (pixel edges: a one-pixel mask is 1×1); all-zero
    masks give zero boxes."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for k, m in enumerate(masks):
        ys, xs = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
        if len(xs):
            boxes[k] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes
