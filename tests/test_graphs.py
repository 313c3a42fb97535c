"""cuda_graph=true (sidnet.engine.graphs): refused in one line where it cannot work; on CUDA, eager's training."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from sidnet.config import ConfigError
from sidnet.engine.graphs import GraphedForward
from sidnet.engine.loader import build_train_loader, to_device, train_dataset_for_loader
from sidnet.engine.trainer import Trainer
from tests.test_train import TINY, _compose

ROOT = Path(__file__).resolve().parents[1]


def test_cuda_graph_is_refused_on_cpu_in_one_line(tmp_path):
    cfg = _compose([*TINY, "cuda_graph=true"])
    with pytest.raises(ConfigError, match=r"^cuda_graph=true is not possible here: it needs a CUDA device .*"
                                          r"set cuda_graph=false$"):  # fmt: skip
        Trainer(cfg, run_dir=tmp_path / "run", project_root=ROOT)


def _trainer(tmp_path: Path, name: str, *, graph: bool) -> Trainer:
    gpu = [o for o in TINY if not o.startswith("device=")] + ["device=cuda", "loader.channels_last=true", "amp=true"]
    cfg = _compose([*gpu, f"cuda_graph={str(graph).lower()}", "batch_size=8"])
    return Trainer(cfg, run_dir=tmp_path / name, project_root=ROOT)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_trains_as_eager_does(tmp_path):
    """Six steps from the same weights on the same batches: losses and weights as eager's (cuDNN deterministic, so
    any difference would be the graph's), one graph for the batch shape, a second one for another shape, and eval
    mode eager."""
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    runs = {}
    for graph in (False, True):
        t = _trainer(tmp_path, f"g{graph}", graph=graph)
        c = t.cfg
        ds = train_dataset_for_loader(t.train_set, cache="none", cache_dir=None, gpu_aug=False, aug=asdict(c.aug),
                                      threads=1)  # fmt: skip
        loader, _ = build_train_loader(ds, batch_size=8, seed=0, workers=0)
        batch = to_device(*next(iter(loader)), device=t.device, channels_last=True)
        t.model.train()
        losses = [t.train_step(*batch)[0].item() for _ in range(6)]
        runs[graph] = losses, {k: v.float().cpu() for k, v in t.model.state_dict().items()}
        if graph:
            assert isinstance(t.ddp_model, GraphedForward) and t.ddp_model.graphs == 1
            t.train_step(batch[0][:4].contiguous(memory_format=torch.channels_last), batch[1][:4])
            assert t.ddp_model.graphs == 2
            t.model.eval()
            with torch.no_grad():
                assert torch.equal(t.ddp_model(batch[0]), t.model(batch[0]))  # eval: the eager model
    (eager_losses, eager_w), (graph_losses, graph_w) = runs[False], runs[True]
    assert graph_losses == pytest.approx(eager_losses, rel=1e-5)
    assert eager_losses[0] == graph_losses[0]  # the first forward: the same kernels on the same inputs
    assert set(eager_w) == set(graph_w)
    for k in eager_w:  # BatchNorm's running statistics included: the capture's warm-up passes were undone
        torch.testing.assert_close(graph_w[k], eager_w[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("graph", "prefetch"), [(False, False), (True, False), (True, True)],
                         ids=["eager", "graphed", "graphed_prefetch"])  # fmt: skip
def test_training_step_never_waits_for_the_gpu(tmp_path, graph, prefetch):
    """The hot path of ``python -m train`` on CUDA with the defaults (fused optimizer) and the GPU-resident loader:
    a batch's mosaics, augmentation (every per-sample op forced on), transfer, the training step (AMP, gradient
    clipping, GradScaler, EMA) and the staged loss copy never make the host wait for the GPU, so the host can queue
    step i+1 while the GPU runs step i. Every synchronising call is listed, not only the first. With
    loader.device_prefetch a thread prepares the batches meanwhile, and the graph's capture waits for it (a CUDA
    call from another thread during a capture would invalidate it)."""
    import warnings

    from sidnet.engine.trainer import _stage

    gpu = [o for o in TINY if not o.startswith(("device=", "batch_size="))]
    cfg = _compose([*gpu, "device=cuda", "amp=true", "batch_size=2", f"cuda_graph={str(graph).lower()}",
                    "loader.cache=device", "loader.gpu_aug=true", "loader.channels_last=true", "aug.mosaic=1.0",
                    "aug.blur_p=1.0", "aug.noise_p=1.0", "aug.gray_p=0.5", "aug.lowlight_p=0.5",
                    f"loader.device_prefetch={str(prefetch).lower()}"])  # fmt: skip
    t = Trainer(cfg, run_dir=tmp_path / "run", project_root=ROOT)
    assert t.optimizer.defaults.get("fused"), "optim.fused=null must mean a fused optimizer on CUDA"
    batches = t._device_batches(0) if prefetch else iter(t._loader(0))
    t.model.train()

    def step(batch) -> None:
        images, targets = batch if prefetch else to_device(*batch, device=t.device, channels_last=True,
                                                           source=t._source)  # fmt: skip
        loss, parts = t.train_step(images, targets)
        _stage(torch.stack([loss.detach(), *(v.detach() for v in parts.values())]).float())

    for _ in range(2):  # warm-up: library loads, the graph's capture, the allocator's first blocks
        step(next(batches))
    torch.cuda.synchronize()
    syncs = []
    for _ in range(2):
        batch = next(batches)  # the DataLoader's own hand-over (worker queue, pinning) is not the hot path
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs += [f"{w.filename}:{w.lineno}: {w.message}"[:300] for w in caught
                  if "called a synchronizing" in str(w.message)]  # fmt: skip
    if prefetch:
        batches.close()
    assert not syncs, "the training step waited for the GPU:\n" + "\n".join(syncs)
