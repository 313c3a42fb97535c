"""SIDNet data layer: readers -> validated :class:`ImageRecord` lists -> :class:`DetectionDataset`.

The names below are imported on first use (PEP 562), not with the package: ``from sidnet.data.sources import ...`` or
``from sidnet.data import DataError`` then costs milliseconds instead of importing torch, OpenCV and albumentations,
so an entry point can refuse a bad argument before it pays for them."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DataError": ".errors",
    "DetectionDataset": ".dataset",
    "ImageRecord": ".records",
    "LetterboxInfo": ".transforms",
    "SeededSampler": ".dataset",
    "SkipReport": ".errors",
    "build_train_transform": ".transforms",
    "collate": ".dataset",
    "dataset_summary": ".dataset",
    "letterbox": ".transforms",
    "load_rgb": ".dataset",
    "load_split": ".splits",
    "read_coco": ".coco",
    "read_yolo": ".yolo",
    "resolve_root": ".sample",
    "sample_root": ".sample",
    "select_negatives": ".dataset",
    "unletterbox_boxes": ".transforms",
}
__all__ = [
    "DataError",
    "DetectionDataset",
    "ImageRecord",
    "LetterboxInfo",
    "SeededSampler",
    "SkipReport",
    "build_train_transform",
    "collate",
    "dataset_summary",
    "letterbox",
    "load_rgb",
    "load_split",
    "read_coco",
    "read_yolo",
    "resolve_root",
    "sample_root",
    "select_negatives",
    "unletterbox_boxes",
]

if TYPE_CHECKING:  # what type checkers and IDEs see: the plain imports
    from .coco import read_coco
    from .dataset import DetectionDataset, SeededSampler, collate, dataset_summary, load_rgb, select_negatives
    from .errors import DataError, SkipReport
    from .records import ImageRecord
    from .sample import resolve_root, sample_root
    from .splits import load_split
    from .transforms import LetterboxInfo, build_train_transform, letterbox, unletterbox_boxes
    from .yolo import read_yolo


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
