"""Build the train/val datasets a run needs from the data config (plain arguments)."""

from __future__ import annotations

import logging
from pathlib import Path

from sidnet.config import DataConfig
from sidnet.data import DataError, DetectionDataset, build_train_transform, load_split, sample_root, select_negatives
from sidnet.data.dataset import dataset_summary
from sidnet.data.splits import parse_split, split_part

log = logging.getLogger("sidnet.data")


def data_root(data: DataConfig, *, project_root: Path) -> Path:
    """The dataset root: the bundled sample when ``root`` is null, else ``root`` relative to the project root."""
    if data.root is None:
        return sample_root()
    root = Path(data.root)
    return root if root.is_absolute() else (project_root / root).resolve()


def load_records(data: DataConfig, split: str, *, project_root: Path, masks: bool = False) -> list:
    """All records of ``split``, validated (one-line DataError on bad input): 'train' or 'val', or part K of N of one
    ('val:0/2', by image id, :func:`sidnet.data.splits.split_part`); ``masks``: every kept box must carry a valid
    instance mask (instance segmentation)."""
    name, part, parts = parse_split(split)
    if name not in ("train", "val"):
        raise DataError(f"split {split!r}: the data config has splits 'train' and 'val' (optionally NAME:K/N)")
    s = getattr(data, name)
    records, report = load_split(format=s.format, root=data_root(data, project_root=project_root), images=s.images,
                                 annotations=s.annotations, labels=s.labels, class_names=tuple(data.class_names),
                                 class_map=dict(data.class_map), polygons=s.polygons,
                                 skip_unlabeled=s.skip_unlabeled, masks=masks,
                                 num_label_classes=data.num_label_classes, lenient=data.lenient)  # fmt: skip
    if report.total:
        log.warning("%s split: %s", split, report)
    return split_part(records, part, parts)


def build_datasets(
    data: DataConfig, *, input_size: int, aug: dict, seed: int, project_root: Path, masks: bool = False
) -> tuple[DetectionDataset, DetectionDataset]:
    """Train (augmented, negatives subsampled by ``negative_ratio``) and val (letterbox only, every image); with
    ``masks`` both carry instance masks."""
    train = select_negatives(load_records(data, "train", project_root=project_root, masks=masks),
                             negative_ratio=data.negative_ratio, seed=seed)  # fmt: skip
    val = load_records(data, "val", project_root=project_root, masks=masks)
    log.info("train: %s | val: %s", dataset_summary(train), dataset_summary(val))
    aug = dict(aug)
    mosaic = float(aug.pop("mosaic", 0.0))  # a dataset-level augmentation (it reads four images), not albumentations
    transform = build_train_transform(size=input_size, masks=masks, **aug)
    if mosaic > 0 and transform is None:
        raise ValueError("aug.mosaic > 0 needs the train transform; set aug.enabled=true or aug.mosaic=0")
    if mosaic > 0 and masks:
        raise ValueError("aug.mosaic is box-only: set aug.mosaic=0 for instance segmentation (or use aug=seg)")
    return (DetectionDataset(train, size=input_size, transform=transform, mosaic=mosaic, masks=masks),
            DetectionDataset(val, size=input_size, masks=masks))  # fmt: skip
