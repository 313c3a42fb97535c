"""Build the train/val datasets a run needs from the data config (plain arguments)."""

from __future__ import annotations

import logging
from pathlib import Path

from sidnet.config import DataConfig
from sidnet.data import DataError, DetectionDataset, build_train_transform, select_negatives
from sidnet.data.dataset import dataset_summary
from sidnet.data.sources import Source, load_sources, split_sources
from sidnet.data.splits import parse_split, split_part

log = logging.getLogger("sidnet.data")


def data_sources(data: DataConfig, split: str, *, project_root: Path) -> list[Source]:
    """The sources of split ``train`` or ``val`` (one, or several: :mod:`sidnet.data.sources`), roots absolute."""
    if split not in ("train", "val"):
        raise DataError(f"split {split!r}: the data config has splits 'train' and 'val' (optionally NAME:K/N)")
    return split_sources(getattr(data, split), split_name=split, root=data.root, base=Path(project_root),
                         class_map=dict(data.class_map), num_label_classes=data.num_label_classes)  # fmt: skip


def load_records(data: DataConfig, split: str, *, project_root: Path, masks: bool = False) -> list:
    """All records of ``split``, validated (one-line DataError on bad input): 'train' or 'val', or part K of N of one
    ('val:0/2', by image id, :func:`sidnet.data.splits.split_part`); ``masks``: every kept box must carry a valid
    instance mask (instance segmentation). Each record knows its source (``record.source``)."""
    name, part, parts = parse_split(split)
    sources = data_sources(data, name, project_root=project_root)
    box_only = [s.name for s in sources if s.box_only]
    if masks and name == "val" and box_only:
        raise DataError(f"data.val source(s) {box_only} are box_only, but the mask evaluation scores masks on every "
                        "val image: keep box-only sources in data.train (or give them masks)")  # fmt: skip
    repeated = [s.name for s in sources if s.repeat != 1]
    if name == "val" and repeated:
        raise DataError(f"data.val source(s) {repeated} set repeat, which would count their images several times in "
                        "AP: use repeat in data.train only")  # fmt: skip
    records, reports = load_sources(sources, class_names=data.class_names, masks=masks, lenient=data.lenient)
    for source, report in reports.items():
        if report.total:
            log.warning("%s split, %s: %s", split, source, report)
    if len(sources) > 1:
        counts = {s.name: sum(r.source == s.name for r in records) for s in sources}
        log.info("%s split: %d images from %s", split, len(records), counts)
    if repeated:
        log.info("%s split: repeat per epoch %s", split, {s.name: s.repeat for s in sources if s.repeat != 1})
    return split_part(records, part, parts)


def build_datasets(
    data: DataConfig, *, input_size: int, aug: dict, seed: int, project_root: Path, masks: bool = False
) -> tuple[DetectionDataset, DetectionDataset]:
    """Train (augmented, negatives subsampled by ``negative_ratio``) and val (letterbox only, every image); with
    ``masks`` both carry instance masks. ``aug``: :class:`sidnet.config.AugConfig` as a dict (``multiscale`` is
    batch-level and applied by the trainer, see :func:`sidnet.data.multiscale.rescale_batch`)."""
    train = select_negatives(load_records(data, "train", project_root=project_root, masks=masks),
                             negative_ratio=data.negative_ratio, seed=seed)  # fmt: skip
    val = load_records(data, "val", project_root=project_root, masks=masks)
    log.info("train: %s | val: %s", dataset_summary(train), dataset_summary(val))
    aug = dict(aug)
    if aug.pop("multiscale", None) and masks:
        raise ValueError("aug.multiscale resizes boxes only: set aug.multiscale=null for instance segmentation")
    mosaic = float(aug.pop("mosaic", 0.0))  # a dataset-level augmentation (it reads four images), not albumentations
    transform = build_train_transform(size=input_size, masks=masks, **aug)
    if mosaic > 0 and transform is None:
        raise ValueError("aug.mosaic > 0 needs the train transform; set aug.enabled=true or aug.mosaic=0")
    if mosaic > 0 and masks:
        raise ValueError("aug.mosaic is box-only: set aug.mosaic=0 for instance segmentation (or use aug=seg)")
    return (DetectionDataset(train, size=input_size, transform=transform, mosaic=mosaic, masks=masks),
            DetectionDataset(val, size=input_size, masks=masks))  # fmt: skip
