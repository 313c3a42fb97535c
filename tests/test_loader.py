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


def _epoch(dataset, *, epoch, seed=3, batch_size=3, world_size=1, rank=0, source=None, workers=0):
    loader, sampler = build_train_loader(dataset, batch_size=batch_size, seed=seed, workers=workers, rank=rank,
                                         world_size=world_size)  # fmt: skip
    sampler.set_epoch(epoch)
    out = []
    for images, packed in loader:
        images, targets = to_device(images, packed, device=torch.device("cpu"), source=source)
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


def _device_and_ram(records, *, mosaic):
    aug = {"mosaic": mosaic}
    make = lambda: DetectionDataset(records, size=SIZE, transform=build_train_transform(size=SIZE),  # noqa: E731
                                    mosaic=mosaic)  # fmt: skip
    ram = train_dataset_for_loader(make(), cache="ram", cache_dir=None, gpu_aug=True, aug=aug, threads=1)
    dev = train_dataset_for_loader(make(), cache="device", cache_dir=None, gpu_aug=True, aug=aug, threads=2)
    return ram, dev, dev.take_device_images(torch.device("cpu"))


@pytest.mark.parametrize("mosaic", [0.0, 1.0])
def test_device_cache_makes_the_batches_of_ram_cache_with_gpu_aug(mosaic):
    """cache=device draws what cache=ram + gpu_aug draws: the same boxes, the same pixels for single images, and for
    mosaics the same composition up to the resize's arithmetic (bilinear on the device vs OpenCV on uint8)."""
    ram, dev, source = _device_and_ram(_records(), mosaic=mosaic)
    assert source.dtype == torch.uint8 and source.shape == (len(ram.records), SIZE, SIZE, 3)
    assert dev.cache.images.size == 0  # the host copy is dropped: forked workers carry boxes only
    for epoch in (0, 1):
        a, b = _epoch(ram, epoch=epoch), _epoch(dev, epoch=epoch, source=source)
        assert len(a) == len(b)
        for (xa, ba, ia), (xb, bb, ib) in zip(a, b, strict=True):
            assert ia == ib and all(torch.equal(p, q) for p, q in zip(ba, bb, strict=True))
            diff = (xa - xb).abs()
            if mosaic == 0:
                assert torch.equal(xa, xb)
            else:
                assert diff.mean() < 2e-3 and diff.max() < 0.25, (float(diff.mean()), float(diff.max()))


def test_device_cache_mosaic_places_the_four_tiles():
    """A mosaic built on the device puts each tile's pixels where MosaicLayout says (flat-coloured tiles)."""
    from sidnet.data.dataset import MosaicLayout

    s = 32
    source = torch.stack([torch.full((s, s, 3), v, dtype=torch.uint8) for v in (10, 60, 110, 160)])
    layout = MosaicLayout(picks=(0, 1, 2, 3), xc=24, yc=40, crop=48, cx0=4, cy0=12)
    index = torch.tensor([[0, 1, 2, 3], [2, -1, -1, -1]])
    geom = torch.tensor([[layout.xc, layout.yc, layout.crop, layout.cx0, layout.cy0], [0] * 5], dtype=torch.float32)
    out = batch_aug.compose(source, index, geom)
    assert torch.equal(out[1], torch.full((3, s, s), 110 / 255.0))
    scale, checked = layout.crop / s, 0
    for k, value in enumerate((10, 60, 110, 160)):
        x0, y0 = layout.corner(k, size=s)  # an output pixel well inside tile k
        u = int((max(x0, 0) + min(x0 + s, 2 * s)) / 2 - layout.cx0) / scale
        v = int((max(y0, 0) + min(y0 + s, 2 * s)) / 2 - layout.cy0) / scale
        if 0 <= u < s and 0 <= v < s:
            assert out[0, :, int(v), int(u)].mul(255).round().tolist() == [value] * 3, (k, u, v)
            checked += 1
    assert checked == 4


def test_device_cache_epoch_depends_only_on_seed_and_epoch_with_workers():
    records = _records()
    _, dev, source = _device_and_ram(records, mosaic=0.5)
    ran = _epoch(dev, epoch=0, source=source)
    assert _same(_epoch(dev, epoch=1, source=source), _epoch(dev, epoch=1, source=source, workers=2))
    assert not _same(ran, _epoch(dev, epoch=1, source=source))


def test_device_cache_errors_are_one_line():
    with pytest.raises(LoaderError, match=r"loader.cache=device .* loader.gpu_aug=true"):
        train_dataset_for_loader(_base(_records()), cache="device", cache_dir=None, gpu_aug=False, aug=AUG,
                                 threads=1)  # fmt: skip
    _, dev, _ = _device_and_ram(_records(), mosaic=0.0)
    loader, _ = build_train_loader(dev, batch_size=2, seed=0, workers=0)
    with pytest.raises(LoaderError, match="source="):
        to_device(*next(iter(loader)), device=torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_cache_on_cuda_makes_the_cpu_batches():
    """The whole device path on CUDA (gather, mosaic, batch augmentation without the random-noise ops) against the
    same path on the CPU: same boxes, pixels equal to float rounding."""
    records, aug = _records(), {"mosaic": 0.7, "noise_p": 0.0, "lowlight_p": 0.0, "blur_p": 0.5}
    ds = train_dataset_for_loader(DetectionDataset(records, size=SIZE, transform=build_train_transform(size=SIZE),
                                                   mosaic=0.7),
                                  cache="device", cache_dir=None, gpu_aug=True, aug=aug, threads=2)  # fmt: skip
    source = ds.take_device_images(torch.device("cuda"))
    loader, sampler = build_train_loader(ds, batch_size=4, seed=5, workers=0)
    sampler.set_epoch(1)
    for images, packed in loader:
        x, t = to_device(images, packed, device=torch.device("cuda"), source=source, channels_last=True)
        y, u = to_device(images, packed, device=torch.device("cpu"), source=source.cpu())
        assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
        diff = (x.cpu() - y).abs()
        assert diff.mean() < 1e-4 and diff.max() < 0.02, (float(diff.mean()), float(diff.max()))
        assert all(torch.equal(a["boxes"].cpu(), b["boxes"]) for a, b in zip(t, u, strict=True))
