"""The training loader: cache=ram|disk gives the uncached batches bit for bit, epoch e depends only on (seed, e), the
sampler's shards, and the device batch augmentation (gpu_aug) against its box transform."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from sidnet.data import DetectionDataset, SeededSampler, build_train_transform, load_split, sample_root
from sidnet.engine import batch_aug
from sidnet.engine.loader import ImageCache, LoaderError, build_train_loader, to_device, train_dataset_for_loader

SIZE = 128
AUG = {"mosaic": 0.5}  # the default pipeline plus mosaic (cache must feed mosaic's extra images too)


def _records(root=None):
    recs, _ = load_split(format="yolo", root=root or sample_root(), images="images/train2017", annotations=None,
                         labels="labels/boxes/train2017", class_names=("person",), class_map={0: 0}, polygons=False,
                         skip_unlabeled=False, masks=False, num_label_classes=1, lenient=False)  # fmt: skip
    return recs


def _base(records, *, lowlight=0.1):
    return DetectionDataset(records, size=SIZE, transform=build_train_transform(size=SIZE, lowlight_p=lowlight),
                            mosaic=AUG["mosaic"])  # fmt: skip


def _epoch(dataset, *, epoch, seed=3, batch_size=3, world_size=1, rank=0):
    loader, sampler = build_train_loader(dataset, batch_size=batch_size, seed=seed, workers=0, rank=rank,
                                         world_size=world_size)  # fmt: skip
    sampler.set_epoch(epoch)
    out = []
    for images, packed in loader:
        images, targets = to_device(images, packed, device=torch.device("cpu"))
        out.append((images, [t["boxes"] for t in targets], [t["image_id"] for t in targets]))
    return out


def _same(a, b) -> bool:
    return all(torch.equal(x[0], y[0]) and all(torch.equal(p, q) for p, q in zip(x[1], y[1], strict=True))
               for x, y in zip(a, b, strict=True)) and len(a) == len(b)  # fmt: skip


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_cached_batches_equal_uncached_bit_for_bit(tmp_path, mode):
    records = _records()
    plain = train_dataset_for_loader(_base(records), cache="none", cache_dir=None, gpu_aug=False, aug=AUG, threads=1)
    cached = train_dataset_for_loader(_base(records), cache=mode, cache_dir=tmp_path, gpu_aug=False, aug=AUG,
                                      threads=2)  # fmt: skip
    assert plain.cache is None and cached.cache is not None and len(cached.cache.images) == len(records)
    for epoch in (0, 1):
        a, b = _epoch(plain, epoch=epoch), _epoch(cached, epoch=epoch)
        assert _same(a, b)
    assert a[0][0].dtype == torch.float32 and 0 <= a[0][0].min() and a[0][0].max() <= 1
    # uint8 leaves the workers; the division happens in to_device (identical to DetectionDataset's float path)
    image, _ = plain[(0, 7)]
    reference, _ = _base(records)[(0, 7)]
    assert image.dtype == torch.uint8 and torch.equal(image.float().div_(255.0), reference)


def test_disk_cache_is_reused_and_rebuilt_when_an_image_changes(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(sample_root(), data)
    records = _records(data)
    first = ImageCache.build(records, size=SIZE, mode="disk", cache_dir=cache)
    files = sorted(p.name for p in cache.glob("*.npy"))
    assert len(files) == 2  # images + decoded flags
    again = ImageCache.build(records, size=SIZE, mode="disk", cache_dir=cache)
    assert isinstance(again.images, np.memmap) and sorted(p.name for p in cache.glob("*.npy")) == files
    assert np.array_equal(first.images, again.images) and all(map(np.array_equal, first.boxes, again.boxes))
    os.utime(records[0].path, ns=(1, 1))  # an edited image gets a new key, not a stale cache
    ImageCache.build(records, size=SIZE, mode="disk", cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == 4


def test_loader_errors_are_one_line(tmp_path):
    with pytest.raises(LoaderError, match="loader.cache='gpu'"):
        train_dataset_for_loader(_base(_records()), cache="gpu", cache_dir=None, gpu_aug=False, aug={}, threads=1)
    with pytest.raises(TypeError, match="aug.bogus"):
        batch_aug.params_from_aug_config({"bogus": 1}, size=SIZE)


@pytest.mark.parametrize("cache", ["none", "ram"])
def test_epoch_depends_only_on_seed_and_epoch(cache, tmp_path):
    """What exact resume needs: a fresh loader asked for epoch 1 gives what a loader that ran epoch 0 gives."""
    records = _records()
    for gpu_aug in (False, True):
        make = lambda g=gpu_aug: train_dataset_for_loader(_base(records), cache=cache, cache_dir=tmp_path,  # noqa: E731
                                                          gpu_aug=g, aug=AUG, threads=1)  # fmt: skip
        ran = make()
        _epoch(ran, epoch=0)
        assert _same(_epoch(ran, epoch=1), _epoch(make(), epoch=1))
        assert not _same(_epoch(make(), epoch=0), _epoch(make(), epoch=1))


def test_gpu_aug_batches_are_deterministic_and_boxes_stay_inside():
    records = _records()
    ds = train_dataset_for_loader(_base(records, lowlight=0.5), cache="ram", cache_dir=None, gpu_aug=True,
                                  aug={**AUG, "blur_p": 0.5, "noise_p": 0.5, "gray_p": 0.3}, threads=1)  # fmt: skip
    a, b = _epoch(ds, epoch=2), _epoch(ds, epoch=2)
    assert _same(a, b)
    images = torch.cat([x[0] for x in a])
    assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1
    boxes = torch.cat([torch.cat(x[1]) for x in a])
    assert len(boxes) and (boxes >= 0).all() and (boxes <= SIZE).all() and (boxes[:, 2:] > boxes[:, :2]).all()


def test_gpu_aug_geometry_moves_pixels_and_boxes_together():
    cfg = batch_aug.params_from_aug_config({"flip_p": 1.0, "brightness": 0, "contrast": 0, "hue": 0, "saturation": 0,
                                            "value": 0, "blur_p": 0, "noise_p": 0, "gray_p": 0, "lowlight_p": 0},
                                           size=SIZE)  # fmt: skip
    for seed in range(5):
        params, noise_seed = batch_aug.sample_params(np.random.default_rng(seed), **cfg)
        image = torch.zeros(1, 3, SIZE, SIZE)
        image[..., 40:70, 30:60] = 1.0
        moved, keep = batch_aug.move_boxes(np.float32([[30, 40, 60, 70]]), params, size=SIZE, min_visibility=0.1)
        out = batch_aug.apply(image, torch.from_numpy(params)[None], seeds=[noise_seed])
        ys, xs = (out[0, 0] > 0.6).nonzero(as_tuple=True)
        if not keep.any():
            continue
        found = np.float32([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        assert np.abs(found - moved[0]).max() <= 1.5, (seed, found, moved)


def test_hsv_shift_of_zero_is_identity_and_hue_turns_the_wheel():
    x = torch.rand(2, 3, 8, 8)
    zero = torch.zeros(2, 1, 1, 1)
    assert torch.allclose(batch_aug._shift_hsv(x, zero, zero, zero), x, atol=1e-5)
    red = torch.zeros(1, 3, 1, 1)
    red[:, 0] = 1
    third = torch.full((1, 1, 1, 1), 1 / 3)
    z = torch.zeros(1, 1, 1, 1)
    assert torch.allclose(batch_aug._shift_hsv(red, third, z, z).flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)


def test_sampler_shards_are_disjoint_and_keep_single_process_seeds():
    one = list(SeededSampler(10, seed=5))
    for world in (2, 3, 4):
        shards = [list(SeededSampler(10, seed=5, num_replicas=world, rank=r)) for r in range(world)]
        assert all(len(s) == -(-10 // world) for s in shards)
        flat = [p for s in shards for p in s]
        assert {i for i, _ in flat} == set(range(10))
        first = [p for s in shards for p in s[: 10 // world]]  # before the wrap-around padding
        assert len({i for i, _ in first}) == len(first)
        assert set(flat) <= set(one)  # a sample keeps its one-process augmentation seed
    with pytest.raises(ValueError, match="rank 2"):
        SeededSampler(10, seed=0, num_replicas=2, rank=2)
