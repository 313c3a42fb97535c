"""Torch dataset over :class:`ImageRecord` lists: decode, letterbox, augment, to tensor."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .errors import DataError
from .masks import boxes_from_masks, letterbox_masks, record_masks
from .records import ImageRecord
from .transforms import LetterboxInfo, letterbox

log = logging.getLogger("sidnet.data")


def select_negatives(records: Sequence[ImageRecord], *, negative_ratio: float, seed: int) -> list[ImageRecord]:
    """Keep every positive and ``round(negative_ratio * n_positive)`` negatives drawn with ``seed``.

    Order is preserved (positives and the kept negatives stay where they were); ``negative_ratio < 0`` keeps all.
    """
    if negative_ratio < 0:
        return list(records)
    positives = sum(not r.is_negative for r in records)
    negative_idx = [i for i, r in enumerate(records) if r.is_negative]
    keep = min(len(negative_idx), round(negative_ratio * positives))
    chosen = set(random.Random(seed).sample(negative_idx, keep))
    return [r for i, r in enumerate(records) if not r.is_negative or i in chosen]


class SeededSampler(Sampler):
    """Shuffles like ``RandomSampler`` and hands each index out with its own augmentation seed.

    Order and seeds of epoch ``e`` depend only on ``(seed, e)``: call :meth:`set_epoch` before each epoch (as with
    ``DistributedSampler``). Yields ``(index, sample_seed)`` for :class:`DetectionDataset`.

    With ``num_replicas > 1`` (DDP) every rank draws the same global permutation and seeds, pads it by wrapping
    around to a multiple of ``num_replicas`` (as ``DistributedSampler`` does) and takes positions
    ``rank, rank + num_replicas, ...``: the ranks' shards are disjoint up to the padding, and a sample keeps the
    augmentation seed it has in a one-process run, whatever the number of processes.

    ``repeats`` (one count per index, e.g. ``record.repeat``): index i appears ``repeats[i]`` times per epoch, each
    time with its own position and seed (oversampling a small source); None = once each.
    """

    def __init__(self, num_samples: int, *, seed: int, num_replicas: int = 1, rank: int = 0,
                 repeats: Sequence[int] | None = None) -> None:  # fmt: skip
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        if repeats is not None and len(repeats) != num_samples:
            raise ValueError(f"repeats has {len(repeats)} counts for {num_samples} samples")
        self.index = None
        if repeats is not None and any(r != 1 for r in repeats):
            self.index = [i for i, r in enumerate(repeats) for _ in range(int(r))]
            num_samples = len(self.index)
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0
        self.num_replicas, self.rank = num_replicas, rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.num_samples // self.num_replicas)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        if self.index is not None:
            order = [self.index[k] for k in order]
        seeds = torch.randint(0, 2**62, (self.num_samples,), generator=g).tolist()
        pairs = list(zip(order, seeds, strict=True))
        if self.num_replicas > 1:
            total = len(self) * self.num_replicas
            pairs = (pairs * -(-total // len(pairs)))[:total] if pairs else pairs
            pairs = pairs[self.rank :: self.num_replicas]
        return iter(pairs)


def dataset_summary(records: Sequence[ImageRecord]) -> dict[str, int]:
    """Counts for logging: ``images``, ``positives``, ``negatives``, ``boxes``."""
    negatives = sum(r.is_negative for r in records)
    return {
        "images": len(records),
        "positives": len(records) - negatives,
        "negatives": negatives,
        "boxes": int(sum(len(r.boxes) for r in records)),
    }


def load_rgb(record: ImageRecord) -> np.ndarray:
    """Decode ``record.path`` to ``(H, W, 3)`` uint8 RGB in the frame the annotations use.

    Raises:
        DataError: the file no longer decodes, or its size differs from the one the readers recorded.
    """
    # IGNORE_ORIENTATION: annotations (COCO, YOLO exports) refer to the raw pixel grid, and the readers took the
    # size from the header without applying EXIF rotation; honouring EXIF here would misalign every box.
    image = cv2.imread(str(record.path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise DataError(
            f"image failed to decode during training: {record.path}; replace or delete the file and "
            f"restart (the up-front check passed, so it changed or is corrupt past its header)"
        )
    if image.shape[:2] != (record.height, record.width):
        raise DataError(
            f"image {record.path} is {image.shape[1]}x{image.shape[0]} but was "
            f"{record.width}x{record.height} when the labels were read; restore the file and restart"
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@dataclass(frozen=True)
class MosaicLayout:
    """Where a 4-image mosaic takes its pixels from: ``picks`` (dataset indices, tiles top-left, top-right,
    bottom-left, bottom-right) around the centre ``(xc, yc)`` of a ``2S × 2S`` canvas, and the square ``crop`` at
    ``(cx0, cy0)`` that is resized to ``S``. The CPU path composes it with NumPy + OpenCV, ``loader.cache=device``
    on the device (:func:`sidnet.engine.batch_aug.compose`); the boxes come from :meth:`boxes` in both."""

    picks: tuple[int, int, int, int]
    xc: int
    yc: int
    crop: int
    cx0: int
    cy0: int

    def corner(self, k: int, *, size: int) -> tuple[int, int]:
        """Top-left canvas corner of tile ``k``."""
        return (self.xc - size if k % 2 == 0 else self.xc), (self.yc - size if k < 2 else self.yc)

    def boxes(self, tile_boxes: Sequence[np.ndarray], tile_labels: Sequence[np.ndarray], *,
              size: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """The tiles' letterboxed boxes in the output image: moved, cropped, scaled to ``size``, clipped; a box is
        kept when at least 30% of it stays visible and it keeps at least 2 px a side."""
        s = size
        moved = [np.asarray(b, np.float32).reshape(-1, 4) + np.float32([*self.corner(k, size=s)] * 2)
                 for k, b in enumerate(tile_boxes)]  # fmt: skip
        boxes = (np.concatenate(moved) - np.float32([self.cx0, self.cy0, self.cx0, self.cy0])) * (s / self.crop)
        labels = np.concatenate([np.asarray(lab).reshape(-1) for lab in tile_labels])
        clipped = np.clip(boxes, 0, s)
        area = lambda b: (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)  # noqa: E731
        keep = (area(clipped) >= 0.3 * area(boxes)) & ((clipped[:, 2:] - clipped[:, :2]).min(axis=1) >= 2)
        return clipped[keep].astype(np.float32), labels[keep].astype(np.int64)


class DetectionDataset(Dataset):
    """Letterboxed detection samples.

    ``dataset[i]`` returns ``(image, target)``:
        image: float32 ``(3, size, size)`` RGB in ``[0, 1]``.
        target: dict with ``boxes`` float32 ``(K, 4)`` xyxy in network-input pixels, ``labels`` int64 ``(K,)``,
        ``image_id`` int, ``orig_size`` ``(h, w)``, ``letterbox`` :class:`LetterboxInfo`. With a train transform,
        ``letterbox`` describes the letterbox step only (augmentation moves boxes further), so use it for eval.

    Args:
        records: from the readers.
        size: square network input size.
        transform: train ``A.Compose`` from :func:`build_train_transform` applied after letterboxing; ``None``
            means letterbox only (eval, or ``aug=none``). It is reseeded from ``torch.initial_seed()`` in each
            DataLoader worker/epoch, so augmentations differ across workers and epochs and follow
            ``torch.manual_seed`` when ``num_workers=0``.
        lenient: an image that stopped decoding is logged and replaced by the next loadable record instead of
            raising :class:`DataError` (training only: evaluation must stay strict or images get counted twice).
        mosaic: probability of a 4-image mosaic (YOLOv4/v5) instead of one image, training only. With a few
            hundred boxes it multiplies the contexts and scales each person is seen in; it needs a transform.
        masks: also return ``target["masks"]``, uint8 ``(K, size, size)`` instance masks in network pixels, row for
            row with ``boxes``; the transform (built with ``masks=True``) moves them with the image, and the boxes
            are then recomputed as the masks' tight extents (instances whose mask left the image are dropped).
            ``target["has_masks"]`` is False for a record of a box-only source (``record.box_only``): its boxes are
            augmented as without masks, and its ``masks`` are zeros that the mask loss leaves out.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        *,
        size: int,
        transform: Any = None,
        lenient: bool = False,
        mosaic: float = 0.0,
        masks: bool = False,
    ) -> None:
        if masks and mosaic > 0:
            raise ValueError("mosaic is box-only: use mosaic=0 with masks")
        self.records = list(records)
        self.masks = masks
        self.size = size
        self.transform = transform
        self.lenient = lenient
        self.mosaic = mosaic
        self._seeded_with: int | None = None
        self._rng = np.random.default_rng(0)

    def __len__(self) -> int:
        return len(self.records)

    def _reseed(self) -> None:
        # Forked workers inherit one identical albumentations RNG (and non-persistent workers re-fork it unchanged
        # every epoch); torch.initial_seed() is distinct per worker and epoch. A single shared generator is passed
        # down, because Compose.set_random_seed gives each child an identically seeded RNG, which correlates
        # their coin flips (e.g. noise would only ever fire together with a flip).
        seed = torch.initial_seed()
        if seed != self._seeded_with:
            self._seeded_with = seed
            self._rng = np.random.default_rng(seed)
            self.transform.set_random_state(self._rng, random.Random(seed))

    def _load(self, index: int) -> tuple[ImageRecord, np.ndarray, np.ndarray, LetterboxInfo]:
        """Record, letterboxed image and its boxes (network pixels)."""
        for attempt in range(len(self.records) if self.lenient else 1):
            record = self.records[(index + attempt) % len(self.records)]
            try:
                image = load_rgb(record)
                break
            except DataError as err:
                if not self.lenient:
                    raise
                log.warning("%s (lenient: using the next image instead)", err)
        else:
            raise DataError(f"no image of the {len(self.records)} in this dataset decodes; check the data folder")
        image, boxes, info = letterbox(image, record.boxes, size=self.size)
        return record, image, boxes, info

    def _mosaic_layout(self, index: int) -> MosaicLayout:
        """The mosaic of ``index`` drawn from this sample's RNG: three more images, the centre and the crop."""
        s, rng = self.size, self._rng
        picks = (index, *rng.integers(0, len(self.records), size=3).tolist())
        xc, yc = (int(v) for v in rng.uniform(0.5 * s, 1.5 * s, size=2))
        crop = int(rng.uniform(s, 2 * s))
        cx0 = int(np.clip(xc - crop / 2, 0, 2 * s - crop))
        cy0 = int(np.clip(yc - crop / 2, 0, 2 * s - crop))
        return MosaicLayout(picks=picks, xc=xc, yc=yc, crop=crop, cx0=cx0, cy0=cy0)

    def _mosaic(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Four letterboxed images around a random centre of a 2S canvas, then a random S..2S crop resized to S."""
        s, layout = self.size, self._mosaic_layout(index)
        canvas = np.full((2 * s, 2 * s, 3), 114, dtype=np.uint8)
        all_boxes, all_labels = [], []
        for k, i in enumerate(layout.picks):
            record, image, boxes, _ = self._load(i)
            x0, y0 = layout.corner(k, size=s)
            x1, y1, x2, y2 = max(x0, 0), max(y0, 0), min(x0 + s, 2 * s), min(y0 + s, 2 * s)
            canvas[y1:y2, x1:x2] = image[y1 - y0 : y2 - y0, x1 - x0 : x2 - x0]
            all_boxes.append(boxes)
            all_labels.append(record.labels)
        c, cx0, cy0 = layout.crop, layout.cx0, layout.cy0
        image = cv2.resize(canvas[cy0 : cy0 + c, cx0 : cx0 + c], (s, s), interpolation=cv2.INTER_LINEAR)
        boxes, labels = layout.boxes(all_boxes, all_labels, size=s)
        return image, boxes, labels

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        if isinstance(index, tuple):
            # (index, seed) from SeededSampler: this sample's augmentation depends on the seed alone, whatever
            # worker draws it and whatever that worker did before (exact resume with persistent workers).
            index, seed = index
            if self.transform is not None:
                self._rng = np.random.default_rng(seed)
                self.transform.set_random_state(self._rng, random.Random(seed))
        elif self.transform is not None:
            self._reseed()
        record, image, boxes, info = self._load(index)
        labels = record.labels.copy()  # torch.from_numpy shares memory: never hand out the record's own array
        if self.transform is not None and self.mosaic > 0 and self._rng.random() < self.mosaic:
            image, boxes, labels = self._mosaic(index)
        with_masks = self.masks and not record.box_only  # a box-only source's image: boxes as usual, no masks
        masks = letterbox_masks(record_masks(record), info, size=self.size) if with_masks else None
        if self.transform is not None and masks is not None:
            image, boxes, labels, masks = self._transform_with_masks(image, boxes, labels, masks)
        elif self.transform is not None:
            extra = {"indices": np.arange(len(boxes))} if self.masks else {}  # a mask transform's label fields
            out = self.transform(image=image, bboxes=boxes, labels=labels, **extra)
            image = out["image"]
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        tensor = self.image_tensor(image)
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "image_id": record.image_id,
            "orig_size": (record.height, record.width),
            "letterbox": info,
        }
        if self.masks:
            if masks is None:  # box-only: zero rows keep the target shape; has_masks=False keeps them out of the loss
                masks = np.zeros((len(boxes), self.size, self.size), dtype=np.uint8)
            target["masks"] = torch.from_numpy(np.ascontiguousarray(masks))
            target["has_masks"] = with_masks
        return tensor, target

    @staticmethod
    def image_tensor(image: np.ndarray) -> torch.Tensor:
        """``(S, S, 3)`` uint8 → float32 ``(3, S, S)`` in ``[0, 1]`` (the training loader overrides this to hand
        uint8 to the device and divide there: a quarter of the bytes through worker IPC, pinning and the copy)."""
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)

    def _transform_with_masks(self, image, boxes, labels, masks):
        """Augment image, boxes and masks together; boxes come back as the augmented masks' extents."""
        extra = {"masks": list(masks)} if len(masks) else {}
        out = self.transform(image=image, bboxes=boxes, labels=labels, indices=np.arange(len(boxes)), **extra)
        kept = np.asarray(out["indices"], dtype=np.int64).reshape(-1)
        moved = np.stack(out["masks"]).astype(np.uint8) if len(masks) else masks
        masks = moved[kept] if len(kept) else np.zeros((0, self.size, self.size), dtype=np.uint8)
        present = masks.any(axis=(1, 2))
        masks = masks[present]
        labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)[present]
        return out["image"], boxes_from_masks(masks), labels, masks


def collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Stack images to ``(N, 3, S, S)``; targets stay a list (their box counts differ)."""
    images, targets = zip(*batch, strict=True)
    return torch.stack(images), list(targets)
