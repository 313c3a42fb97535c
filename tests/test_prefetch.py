"""loader.device_prefetch (sidnet.engine.prefetch): the same batches, in order, prepared ahead by a thread."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from sidnet.checkpoint import load_checkpoint
from sidnet.engine.prefetch import DevicePrefetcher
from sidnet.engine.trainer import Trainer, train
from tests.test_train import TINY, _compose

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "sidnet-prefetch"]


def test_prefetcher_keeps_the_order_and_raises_the_workers_error():
    seen = []

    def prepare(i: int, batch: int) -> tuple[int, torch.Tensor]:
        seen.append(threading.current_thread().name)
        if batch == 7:
            raise ValueError("batch 7 is bad")
        return i, torch.full((2,), batch)

    out = list(DevicePrefetcher(range(5), prepare, device=CPU, depth=2))
    assert [i for i, _ in out] == [0, 1, 2, 3, 4] and [int(t[0]) for _, t in out] == [0, 1, 2, 3, 4]
    assert set(seen) == {"sidnet-prefetch"}  # prepared off the consumer's thread
    with pytest.raises(ValueError, match="^batch 7 is bad$"):
        list(DevicePrefetcher(range(10), prepare, device=CPU))
    assert not _threads()


def test_prefetcher_thread_stops_when_the_loop_breaks():
    started = []

    def endless():
        i = 0
        while True:
            started.append(i)
            yield i
            i += 1

    batches = iter(DevicePrefetcher(endless(), lambda i, b: b, device=CPU, depth=3))
    assert [next(batches) for _ in range(4)] == [0, 1, 2, 3]
    batches.close()
    assert not _threads()
    assert len(started) <= 4 + 3 + 2  # at most depth batches ahead (+ one in hand, one being put)
    with pytest.raises(ValueError, match="depth=0"):
        DevicePrefetcher([], lambda i, b: b, device=CPU, depth=0)


def test_training_with_device_prefetch_is_training_without(tmp_path):
    """Two epochs with the device cache, batch augmentation, mosaics and multi-scale: the same weights, bit for
    bit, and the same losses, whether a thread prepares the batches ahead or the loop does."""
    common = [*TINY, "epochs=2", "loader.cache=device", "loader.gpu_aug=true", "aug.mosaic=0.5",
              "aug.multiscale=[96,160]"]  # fmt: skip
    runs = {}
    for prefetch in (False, True):
        cfg = _compose([*common, f"loader.device_prefetch={str(prefetch).lower()}"])
        runs[prefetch] = train(cfg, run_dir=tmp_path / str(prefetch), project_root=ROOT)
    assert [h["loss"] for h in runs[True]["history"]] == [h["loss"] for h in runs[False]["history"]]
    a = load_checkpoint(tmp_path / "False" / "last.pt")["model_state"]
    b = load_checkpoint(tmp_path / "True" / "last.pt")["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not _threads()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prefetched_cuda_batches_are_the_inline_ones(tmp_path):
    """On CUDA the prefetched batches (side stream, background thread) equal the inline ones exactly: mosaics,
    every per-sample augmentation op, channels_last, multi-scale."""
    gpu = [o for o in TINY if not o.startswith(("device=", "batch_size="))]
    overrides = [*gpu, "device=cuda", "batch_size=8", "loader.cache=device", "loader.gpu_aug=true",
                 "loader.channels_last=true", "aug.mosaic=0.5", "aug.blur_p=0.5", "aug.noise_p=0.5",
                 "aug.multiscale=[96,160]"]  # fmt: skip
    batches = {}
    for prefetch in (False, True):
        t = Trainer(_compose([*overrides, f"loader.device_prefetch={str(prefetch).lower()}"]),
                    run_dir=tmp_path / str(prefetch), project_root=ROOT)  # fmt: skip
        got = t._device_batches(0)
        batches[prefetch] = [(x.clone(), [{k: v.clone() if torch.is_tensor(v) else v for k, v in d.items()}
                                          for d in y]) for x, y in got]  # fmt: skip
        got.close()
    assert len(batches[True]) == len(batches[False]) > 0
    for (xa, ya), (xb, yb) in zip(batches[False], batches[True], strict=True):
        assert xa.shape == xb.shape and xb.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(xa, xb)
        for da, db in zip(ya, yb, strict=True):
            assert torch.equal(da["boxes"], db["boxes"]) and da["image_id"] == db["image_id"]
    assert not _threads()


def _prepared_on(trainer: Trainer) -> set[str]:
    """The threads that prepared the first batch of epoch 0."""
    where, prepare = [], trainer._device_batch

    def spy(index, batch, *, epoch):
        where.append(threading.current_thread().name)
        return prepare(index, batch, epoch=epoch)

    trainer._device_batch = spy
    batches = trainer._device_batches(0)
    next(batches)
    batches.close()
    assert where
    return set(where)


@pytest.mark.parametrize(("setting", "threaded"), [("null", False), ("true", True), ("false", False)])
def test_device_prefetch_null_means_on_cuda_only(tmp_path, setting, threaded):
    """The default (null) prefetches on CUDA only: on this CPU the loop prepares its own batches; true forces the
    thread."""
    t = Trainer(_compose([*TINY, f"loader.device_prefetch={setting}"]), run_dir=tmp_path / "run", project_root=ROOT)
    assert _prepared_on(t) == ({"sidnet-prefetch"} if threaded else {threading.current_thread().name})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_prefetch_null_prefetches_on_cuda(tmp_path):
    gpu = [o for o in TINY if not o.startswith("device=")]
    t = Trainer(_compose([*gpu, "device=cuda"]), run_dir=tmp_path / "run", project_root=ROOT)
    assert _prepared_on(t) == {"sidnet-prefetch"}
