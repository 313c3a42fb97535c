"""Build the train/val datasets a run needs from the data config (plain arguments)."""

from __future__ import annotations

import logging
from pathlib import Path

from sidnet.config import DataConfig
from sidnet.data import DetectionDataset, build_train_transform, load_split, sample_root, select_negatives
from sidnet.data.dataset import dataset_summary

log = logging.getLogger("sidnet.data")


def data_root(data: DataConfig, *, project_root: Path) -> Path:
    """The dataset root: the bundled sample when ``root`` is null, else ``root`` relative to the project root."""
    if data.root is None:
        return sample_root()
    root = Path(data.root)
    return root if root.is_absolute() else (project_root / root).resolve()


def load_records(data: DataConfig, split: str, *, project_root: Path) -> list:
    """All records of ``split`` ('train' or 'val'), validated (one-line DataError on bad input)."""
    s = getattr(data, split)
    records, report = load_split(format=s.format, root=data_root(data, project_root=project_root), images=s.images,
                                 annotations=s.annotations, labels=s.labels, class_names=tuple(data.class_names),
                                 class_map=dict(data.class_map),
                                 num_label_classes=data.num_label_classes, lenient=data.lenient)  # fmt: skip
    if report.total:
        log.warning("%s split: %s", split, report)
    return records


def build_datasets(
    data: DataConfig, *, input_size: int, aug: dict, seed: int, project_root: Path
) -> tuple[DetectionDataset, DetectionDataset]:
    """Train (augmented, negatives subsampled by ``negative_ratio``) and val (letterbox only, every image)."""
    train = select_negatives(load_records(data, "train", project_root=project_root),
                             negative_ratio=data.negative_ratio, seed=seed)  # fmt: skip
    val = load_records(data, "val", project_root=project_root)
    log.info("train: %s | val: %s", dataset_summary(train), dataset_summary(val))
    aug = dict(aug)
    mosaic = float(aug.pop("mosaic", 0.0))  # a dataset-level augmentation (it reads four images), not albumentations
    transform = build_train_transform(size=input_size, **aug)
    if mosaic > 0 and transform is None:
        raise ValueError("aug.mosaic > 0 needs the train transform; set aug.enabled=true or aug.mosaic=0")
    return (DetectionDataset(train, size=input_size, transform=transform, mosaic=mosaic),
            DetectionDataset(val, size=input_size))  # fmt: skip
