"""SIDNet data layer: readers -> validated :class:`ImageRecord` lists -> :class:`DetectionDataset`."""

from .coco import read_coco
from .dataset import DetectionDataset, SeededSampler, collate, dataset_summary, load_rgb, select_negatives
from .errors import DataError, SkipReport
from .records import ImageRecord
from .sample import resolve_root, sample_root
from .splits import load_split
from .transforms import LetterboxInfo, build_train_transform, letterbox, unletterbox_boxes
from .yolo import read_yolo

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
