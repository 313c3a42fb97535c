"""The training loader: an optional decoded + letterboxed image cache, uint8 batches divided on the device, the
sampler's shard for this rank, and (``gpu_aug``) the augmentation moved to the device as batch operations.

Measured (``benchmarks/results/loader/README.md``): per 416² image on one CPU core, JPEG decode ≈ 8 ms,
letterbox ≈ 2–4 ms, the albumentations pipeline ≈ 20–30 ms (Affine and HueSaturationValue ≈ 8–11 ms each), and
float32 conversion + collate ≈ 5–25 ms (a float32 batch is 4× the bytes of uint8 through worker IPC, pinning and the
host-to-device copy). So:

- ``cache=ram|disk`` (Ultralytics ``cache=``): every image decoded and letterboxed once, kept as one
  ``(N, S, S, 3)`` uint8 array in memory (shared copy-on-write with forked workers) or one memory-mapped ``.npy``
  reused across runs (keyed by the files' paths, sizes and mtimes, and the input size). The transform then sees the
  very same uint8 array it would have decoded, so batches are bit-identical to ``cache=none``.
- Batches leave the workers as uint8 and become float ``[0, 1]`` on the device (same IEEE division: identical).
- ``gpu_aug``: flip + scale/translate + the photometric ops run on the device for the whole batch
  (:mod:`sidnet.engine.batch_aug`); workers only copy the cached image, build mosaics and move boxes.
- ``cache=device``: the cache itself lives on the training device (one ``(N, S, S, 3)`` uint8 tensor, 0.5 MB per
  416² image) and no pixel crosses a process or the PCIe bus during training: workers hand out only which cached
  images a sample is made of (one, or four for a mosaic, with the mosaic's layout), its boxes and its augmentation
  parameters; the device gathers the images, composes the mosaics (:func:`sidnet.engine.batch_aug.compose`) and
  augments the batch. Needs ``gpu_aug`` when the augmentation is on. Same draws as ``cache=ram`` + ``gpu_aug``:
  boxes identical, pixels identical without mosaic (a mosaic's resize is bilinear on the device instead of OpenCV's).

Order and augmentation of epoch ``e`` depend only on ``(seed, e)`` (and the number of ranks) in every mode: each
sample's parameters come from the seed :class:`~sidnet.data.SeededSampler` hands out with it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from sidnet.data import DataError, DetectionDataset, SeededSampler
from sidnet.data.dataset import load_rgb
from sidnet.data.records import ImageRecord
from sidnet.engine import batch_aug
from sidnet.letterbox import LETTERBOX_FILL, letterbox

log = logging.getLogger("sidnet.data")

CACHE_MODES = ("none", "ram", "disk", "device")


class LoaderError(ValueError):
    """A loader option cannot work here; the message is one line naming the option and the fix."""


class ImageCache:
    """Letterboxed uint8 images ``images[i]`` ``(S, S, 3)`` of ``records[i]``, their boxes in network pixels and
    whether each decoded (``ok``; only a lenient dataset keeps going past one that did not)."""

    def __init__(self, images: np.ndarray, boxes: list[np.ndarray], ok: np.ndarray) -> None:
        self.images, self.boxes, self.ok = images, boxes, ok

    @classmethod
    def build(cls, records: Sequence[ImageRecord], *, size: int, mode: str, cache_dir: Path | None = None,
              threads: int = 8, lenient: bool = False) -> ImageCache:  # fmt: skip
        """Decode and letterbox every record once (``threads`` at a time: OpenCV decodes without the GIL).

        ``mode='ram'``: an in-memory array (refused with one line when it would not fit the free memory);
        ``'disk'``: ``cache_dir/<key>.npy`` memory-mapped, built on first use and reused while the images, their
        sizes, mtimes and ``size`` are unchanged (an atomic rename, so concurrent ranks never see a partial file).
        """
        if mode not in ("ram", "disk"):
            raise LoaderError(f"loader.cache={mode!r}: use none, ram, disk or device")
        n, nbytes = len(records), len(records) * size * size * 3
        boxes: list[np.ndarray] = [np.zeros((0, 4), np.float32)] * n
        t0 = time.perf_counter()
        if mode == "ram":
            free = _available_memory()
            if free is not None and nbytes > 0.8 * free:
                raise LoaderError(f"loader.cache=ram needs {nbytes / 2**30:.1f} GiB for {n} images at {size}² but "
                                  f"{free / 2**30:.1f} GiB are free; use loader.cache=disk or none")  # fmt: skip
            images = np.empty((n, size, size, 3), dtype=np.uint8)
            ok = _fill(images, boxes, records, size=size, threads=threads, lenient=lenient)
        else:
            if cache_dir is None:
                raise LoaderError("loader.cache=disk needs loader.cache_dir (a folder for the .npy cache)")
            path = Path(cache_dir) / f"{cache_key(records, size=size)}.npy"
            ok_path = path.with_suffix(".ok.npy")
            if path.is_file() and ok_path.is_file():
                images, ok = np.load(path, mmap_mode="r"), np.load(ok_path)
                boxes = [_letterboxed_boxes(r, size) for r in records]
                log.info("loader.cache=disk: reusing %s (%d images at %d²)", path, n, size)
                return cls(images, boxes, ok)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
                ok = _fill(images, boxes, records, size=size, threads=threads, lenient=lenient)
                images.flush()
                del images
                np.save(ok_path.with_name(f".{ok_path.name}.{os.getpid()}.tmp"), ok)
                os.replace(ok_path.with_name(f".{ok_path.name}.{os.getpid()}.tmp.npy"), ok_path)
                os.replace(tmp, path)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise LoaderError(f"loader.cache=disk could not write {path} ({e.strerror or e}); free "
                                  f"{nbytes / 2**30:.1f} GiB there, or set loader.cache_dir") from e  # fmt: skip
            images = np.load(path, mmap_mode="r")
        log.info("loader.cache=%s: %d images at %d² (%.2f GiB) decoded and letterboxed in %.1f s", mode, n, size,
                 nbytes / 2**30, time.perf_counter() - t0)  # fmt: skip
        return cls(images, boxes, ok)


def _letterboxed_boxes(record: ImageRecord, size: int) -> np.ndarray:
    # Through the one letterbox function (on a blank image of the record's size) so boxes match an uncached load.
    return letterbox(np.zeros((record.height, record.width, 3), np.uint8), record.boxes, size=size)[1]


def cache_key(records: Sequence[ImageRecord], *, size: int) -> str:
    """A digest of what the cached pixels depend on: input size, fill, and each file's path, size and mtime."""
    h = hashlib.sha256(f"sidnet-letterbox-v1 {size} {LETTERBOX_FILL}\n".encode())
    for r in records:
        st = os.stat(r.path)
        h.update(f"{Path(r.path).resolve()} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _fill(images: np.ndarray, boxes: list[np.ndarray], records: Sequence[ImageRecord], *, size: int, threads: int,
          lenient: bool) -> np.ndarray:  # fmt: skip
    """Letterbox every record into ``images[i]`` and its boxes into ``boxes[i]`` (the one letterbox function, so
    pixels and boxes are those an uncached load gives); returns which ones decoded."""
    ok = np.ones(len(records), dtype=bool)

    def one(i: int) -> None:
        try:
            image = load_rgb(records[i])
        except DataError as err:
            if not lenient:
                raise
            log.warning("%s (lenient: using the next image instead)", err)
            ok[i] = False
            return
        images[i], boxes[i], _ = letterbox(image, records[i].boxes, size=size)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(one, range(len(records))))
    return ok


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class TrainLoaderDataset(DetectionDataset):
    """The train :class:`DetectionDataset` as the loader serves it: images from an :class:`ImageCache` when one is
    given, uint8 ``(3, S, S)`` tensors, and with ``gpu_aug`` the sample's batch-augmentation parameters in
    ``target["aug"]`` instead of the albumentations transform (mosaic stays here: it needs other images).

    ``on_device`` (``cache=device``): a sample is no pixels but its source, an int64 ``(4,)`` of cached image
    indices (``[j, -1, -1, -1]`` for one image, four tiles for a mosaic) with ``target["mosaic"]`` the mosaic's
    ``(xc, yc, crop, cx0, cy0)``; :meth:`take_device_images` moves the cached pixels to the device once."""

    def __init__(self, base: DetectionDataset, *, cache: ImageCache | None = None, gpu_aug: dict | None = None,
                 on_device: bool = False):  # fmt: skip
        self.__dict__.update(base.__dict__)
        self.cache, self.gpu_aug, self.on_device = cache, gpu_aug, on_device
        if gpu_aug is not None and self.masks:
            raise LoaderError("loader.gpu_aug is box-only: set loader.gpu_aug=false for instance segmentation")
        if on_device and (cache is None or self.masks or (self.transform is not None and gpu_aug is None)):
            raise LoaderError("loader.cache=device augments on the device: it needs loader.gpu_aug=true and a box "
                              "task (instance masks: use loader.cache=ram)")  # fmt: skip

    def take_device_images(self, device: torch.device) -> torch.Tensor:
        """The cached images as one uint8 ``(N, S, S, 3)`` tensor on ``device`` (refused in one line when it would not
        fit); the host copy is dropped, so forked workers carry boxes only."""
        images = self.cache.images
        nbytes = images.size
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if nbytes > 0.5 * free:
                raise LoaderError(f"loader.cache=device needs {nbytes / 2**30:.1f} GiB on {device} for {len(images)} "
                                  f"images but {free / 2**30:.1f} GiB are free; use loader.cache=ram")  # fmt: skip
        on_device = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.cache = ImageCache(np.empty((0,), np.uint8), self.cache.boxes, self.cache.ok)
        return on_device

    @staticmethod
    def image_tensor(image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))

    def _cached(self, index: int) -> int:
        """The cache row serving ``index``: itself, or (lenient) the next one that decoded."""
        n = len(self.records)
        for attempt in range(n if self.lenient else 1):
            j = (index + attempt) % n
            if self.cache.ok[j]:
                return j
        raise DataError(f"no image of the {n} in this dataset decodes; check the data folder")

    def _load(self, index: int):
        if self.cache is None:
            return super()._load(index)
        j = self._cached(index)
        # A copy: augmentations may write into their input, and the cache is shared by every worker and epoch.
        return self.records[j], np.array(self.cache.images[j]), self.cache.boxes[j].copy(), None

    def _device_sample(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray, np.ndarray,
                                                                            np.ndarray]:  # fmt: skip
        """Source indices, mosaic layout, boxes and labels of ``index`` (the draws :meth:`_mosaic` makes)."""
        layout = np.zeros(5, np.float32)
        if self.transform is not None and self.mosaic > 0 and rng.random() < self.mosaic:
            m = self._mosaic_layout(index)
            tiles = [self._cached(i) for i in m.picks]
            boxes, labels = m.boxes([self.cache.boxes[t] for t in tiles], [self.records[t].labels for t in tiles],
                                    size=self.size)  # fmt: skip
            layout[:] = (m.xc, m.yc, m.crop, m.cx0, m.cy0)
            return torch.tensor(tiles, dtype=torch.int64), layout, boxes, labels
        j = self._cached(index)
        source = torch.tensor([j, -1, -1, -1], dtype=torch.int64)
        return source, layout, self.cache.boxes[j].copy(), self.records[j].labels.copy()

    def __getitem__(self, index):
        if self.gpu_aug is None and not self.on_device:
            return super().__getitem__(index)
        index, seed = index if isinstance(index, tuple) else (index, torch.initial_seed() + index)
        self._rng = rng = np.random.default_rng(seed)
        info = None
        if self.on_device:
            image, layout, boxes, labels = self._device_sample(index, rng)
            record = self.records[int(image[0])]
        else:
            record, pixels, boxes, info = self._load(index)
            labels = record.labels.copy()
            if self.mosaic > 0 and rng.random() < self.mosaic:
                pixels, boxes, labels = self._mosaic(index)
            image = self.image_tensor(pixels)
        target = {"image_id": record.image_id, "orig_size": (record.height, record.width), "letterbox": info}
        if self.on_device:
            target["mosaic"] = torch.from_numpy(layout)
        if self.gpu_aug is not None:
            params, target["aug_seed"] = batch_aug.sample_params(rng, **self.gpu_aug)
            boxes, keep = batch_aug.move_boxes(boxes, params, size=self.size,
                                               min_visibility=self.gpu_aug.get("min_visibility", 0.3))  # fmt: skip
            labels = labels[keep]
            target["aug"] = torch.from_numpy(params)
        target.update(boxes=torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4)),
                      labels=torch.from_numpy(np.asarray(labels).astype(np.int64)))  # fmt: skip
        return image, target


def train_dataset_for_loader(base: DetectionDataset, *, cache: str, cache_dir: Path | None, gpu_aug: bool,
                             aug: dict[str, Any], threads: int) -> TrainLoaderDataset:  # fmt: skip
    """Wrap the train dataset for the loader options (``cache`` none|ram|disk, ``gpu_aug``); ``aug``: the run's
    augmentation config (``build_train_transform`` keywords), which ``gpu_aug`` reproduces on the device. With
    ``cache='device'`` the caller moves the images with :meth:`TrainLoaderDataset.take_device_images` and passes them
    to :func:`to_device` as ``source``."""
    if cache not in CACHE_MODES:
        raise LoaderError(f"loader.cache={cache!r}: use none, ram, disk or device")
    if cache == "device" and base.transform is not None and not gpu_aug:
        raise LoaderError("loader.cache=device augments on the device: set loader.gpu_aug=true (or use cache=ram)")
    image_cache = None
    if cache != "none":
        image_cache = ImageCache.build(base.records, size=base.size, mode="ram" if cache == "device" else cache,
                                       cache_dir=cache_dir, threads=threads, lenient=base.lenient)  # fmt: skip
    gpu = None
    if gpu_aug and base.transform is not None:
        gpu = batch_aug.params_from_aug_config(aug, size=base.size)
    return TrainLoaderDataset(base, cache=image_cache, gpu_aug=gpu, on_device=cache == "device")


def build_train_loader(
    dataset: TrainLoaderDataset,
    *,
    batch_size: int,
    seed: int,
    workers: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    prefetch_factor: int = 4,
    persistent_workers: bool = True,
    worker_init_fn: Callable[[int], None] | None = None,
    collate_fn: Callable | None = None,
) -> tuple[DataLoader, SeededSampler]:
    """The DataLoader over this rank's shard of the (seed, epoch) order: call ``sampler.set_epoch(e)`` per epoch.
    ``batch_size`` is this rank's; ``collate_fn`` defaults to :func:`collate_packed`."""
    repeats = [r.repeat for r in dataset.records]
    sampler = SeededSampler(len(dataset), seed=seed, num_replicas=world_size, rank=rank, repeats=repeats)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=collate_fn or collate_packed, worker_init_fn=worker_init_fn, pin_memory=pin_memory,
                        persistent_workers=persistent_workers and workers > 0,
                        prefetch_factor=prefetch_factor if workers > 0 else None)  # fmt: skip
    return loader, sampler


def collate_packed(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Stack images and pack the targets into a few flat tensors, in the worker.

    A list of per-image target dicts costs the main process a shared-memory handle to receive and a page-locked
    copy to pin for every small tensor (three per image: ~200 per batch of 64); packed, a batch is five tensors.
    Returns ``(images (N, 3, S, S), packed)`` with ``boxes`` (ΣK, 4), ``labels`` (ΣK,), ``counts`` (N,), ``image_id``
    (N,), with gpu_aug ``aug`` (N, P) and ``aug_seed`` (N,), with cache=device ``mosaic`` (N, 5) (and the images
    are then the (N, 4) source indices); :func:`to_device` unpacks it.
    """
    images, targets = zip(*batch, strict=True)
    if "masks" in targets[0]:  # instance masks (K, S, S) per image: kept as the per-image list
        return torch.stack(images), list(targets)
    packed = {"boxes": torch.cat([t["boxes"].reshape(-1, 4) for t in targets]),
              "labels": torch.cat([t["labels"].reshape(-1) for t in targets]),
              "counts": torch.tensor([len(t["boxes"]) for t in targets], dtype=torch.int64),
              "image_id": torch.tensor([int(t["image_id"]) for t in targets], dtype=torch.int64)}  # fmt: skip
    if "aug" in targets[0]:
        packed["aug"] = torch.stack([t["aug"] for t in targets])
        packed["aug_seed"] = torch.tensor([t["aug_seed"] for t in targets], dtype=torch.int64)
    if "mosaic" in targets[0]:
        packed["mosaic"] = torch.stack([t["mosaic"] for t in targets])
    return torch.stack(images), packed


def to_device(images: torch.Tensor, packed: dict[str, Any], *, device: torch.device, channels_last: bool = False,
              source: torch.Tensor | None = None) -> tuple[torch.Tensor, list[dict[str, Any]]]:  # fmt: skip
    """A :func:`collate_packed` batch → float ``(N, 3, S, S)`` in ``[0, 1]`` on ``device`` (batch-augmented when the
    batch carries gpu_aug parameters) and per-image targets (``boxes``, ``labels`` on ``device``: views of one copy,
    so the loss moves nothing; ``image_id`` int). A per-image target list (masks) is returned as it came.
    ``source``: the device-resident cache (``cache=device``), from which the batch's images are gathered."""
    if isinstance(packed, dict) and "mosaic" in packed:
        if source is None:
            raise LoaderError("this batch comes from loader.cache=device: pass the cached images as source=")
        images = batch_aug.compose(source, images, packed["mosaic"])
    else:
        images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = images.float().div_(255.0)
    if isinstance(packed, list):
        return images.contiguous(memory_format=torch.channels_last) if channels_last else images, packed
    if "aug" in packed:  # the parameters stay on the host: apply() decides per-sample ops there and moves them
        images = batch_aug.apply(images, packed["aug"], seeds=packed["aug_seed"].tolist())
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    counts = packed["counts"].tolist()
    boxes = packed["boxes"].to(device, non_blocking=True).split(counts)
    labels = packed["labels"].to(device, non_blocking=True).split(counts)
    ids = packed["image_id"].tolist()
    return images, [{"boxes": b, "labels": lab, "image_id": i} for b, lab, i in zip(boxes, labels, ids, strict=True)]
