"""The record every reader produces and every dataset consumes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


# eq=False: fields hold numpy arrays, whose == is elementwise; identity comparison is the only sane default.
@dataclass(frozen=True, eq=False)
class ImageRecord:
    """One image and its kept annotations, in the original image's pixel frame.

    Attributes:
        path: image file.
        width, height: original image size in pixels (raw pixel data, EXIF orientation not applied).
        boxes: ``(K, 4)`` float32, xyxy, absolute pixels of the original image, clipped to the image.
        labels: ``(K,)`` int64, contiguous class index into the dataset's ``class_names`` (0 = person).
        image_id: stable int id (COCO id, or from the file stem digits / enumeration for YOLO).
        polygons: empty when unknown; otherwise one entry per box, each a tuple of ``(P_i, 2)`` float32 arrays
            in absolute pixels (an empty tuple for a box whose mask is RLE-encoded).
        rles: empty, or one entry per box: the box's COCO RLE dict when its mask is RLE-encoded, else ``None``.
        source: name of the data source it came from (a split may hold several, :mod:`sidnet.data.sources`).
        box_only: its source has boxes but no instance masks (``box_only: true``); a mask-predicting task trains its
            box heads on it and leaves the mask head out (:class:`sidnet.models.maskrcnn.PartialMaskRoIHeads`).
        repeat: how many times an epoch shows it (its source's ``repeat``: oversampling a small source); the
            training sampler expands it, evaluation never repeats.
    """

    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    image_id: int
    polygons: tuple = ()
    rles: tuple = ()
    source: str = ""
    box_only: bool = False
    repeat: int = 1

    @property
    def is_negative(self) -> bool:
        """True when the image has no kept box (pure background for the detector)."""
        return len(self.boxes) == 0


def make_record(
    *,
    path: Path,
    width: int,
    height: int,
    boxes: list[list[float]],
    labels: list[int],
    image_id: int,
    polygons: list[tuple] | None = None,
    rles: list | None = None,
    source: str = "",
) -> ImageRecord:
    """Build an :class:`ImageRecord` from Python lists, fixing dtypes and the empty ``(0, 4)`` shape."""
    return ImageRecord(
        path=Path(path),
        width=int(width),
        height=int(height),
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64).reshape(-1),
        image_id=int(image_id),
        polygons=tuple(polygons) if polygons is not None else (),
        rles=tuple(rles) if rles is not None else (),
        source=source,
    )
