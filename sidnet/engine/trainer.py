"""The training loop: AdamW/SGD, warm-up + cosine, AMP, EMA, gradient clipping, atomic checkpoints, resume,
TensorBoard, periodic COCO evaluation with the best checkpoint kept by AP50; one process or several (DDP, launched by
torchrun: :mod:`sidnet.engine.distributed`), with rank 0 writing and evaluating."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function
from torch.utils.data import DataLoader

from sidnet.anchors import load_anchors
from sidnet.checkpoint import (
    CheckpointError,
    build_model_from_spec,
    deploy_state,
    load_checkpoint,
    numpy_rng_from_plain,
    numpy_rng_to_plain,
    save_checkpoint,
)
from sidnet.config import ConfigError, TrainConfig, validate_anchors, validate_train_config
from sidnet.data.loading import build_datasets, data_sources, load_records
from sidnet.data.multiscale import multiscale_size, rescale_batch
from sidnet.engine.distributed import DistContext, all_reduce_mean
from sidnet.engine.ema import ModelEMA
from sidnet.engine.graphs import GraphedForward
from sidnet.engine.loader import build_train_loader, to_device, train_dataset_for_loader
from sidnet.engine.prefetch import DevicePrefetcher
from sidnet.engine.runlock import acquire_run_lock, release_run_lock
from sidnet.engine.tasks import build_task
from sidnet.evaluation import evaluate_by_source
from sidnet.evaluation.predict import predict_dataset
from sidnet.io import remove_stale_temporaries
from sidnet.progress import progress
from sidnet.safety import claim_run_dir

log = logging.getLogger("sidnet.train")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # torch gives each worker base_seed + worker_id from the loader's generator; derive the rest from it.
    seed = torch.initial_seed() % 2**32
    # The dataset reseeds its augmentation from torch.initial_seed() itself.
    random.seed(seed)
    np.random.seed(seed)
    import cv2

    cv2.setNumThreads(0)  # OpenCV's own thread pool in every worker oversubscribes the CPU (YOLOv5 does the same)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine down to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def build_optimizer(model: torch.nn.Module, *, name: str, lr: float, weight_decay: float, momentum: float,
                    fused: bool | None = None):  # fmt: skip
    """No weight decay on norm weights and biases (they are not scale-free parameters). ``fused``: one kernel per
    parameter group (``fused=True``) instead of the multi-tensor (foreach) kernels; ``None``: fused when the
    parameters are on CUDA. Under AMP a fused optimizer takes the GradScaler's overflow flag as a device tensor, so
    ``scaler.step`` does not read it back (the foreach path synchronises the host with the GPU every step)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    if fused is None:
        fused = any(p.is_cuda for p in decay + no_decay)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kind = {"fused": True} if fused else {}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), **kind)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, **kind)
    raise ValueError(f"unknown optimizer {name!r}; use optim=adamw or optim=sgd")


class Trainer:
    """Owns model, EMA, optimizer, scaler and loaders for one run directory. ``fit()`` → summary dict.

    ``dist``: this process's place in a multi-process run (:func:`sidnet.engine.distributed.setup`); every process
    builds the same model and data, trains on its shard with gradients averaged by DDP, and rank 0 alone evaluates
    and writes (TensorBoard, checkpoints)."""

    def __init__(self, cfg: TrainConfig, *, run_dir: Path, project_root: Path, dist: DistContext | None = None) -> None:
        self.dist = dist or DistContext()
        run_dir = claim_run_dir(run_dir) if self.dist.is_main else Path(run_dir)  # rank 0 alone creates and writes
        self.cfg, self.run_dir, self.project_root = cfg, run_dir, Path(project_root)
        self.device = self.dist.device if self.dist.enabled else resolve_device(cfg.device)
        self.amp = cfg.amp and self.device.type == "cuda"
        seed_everything(cfg.seed)
        m = cfg.model
        self.anchors = None if m.anchors is None else load_anchors(m.anchors, project_root=self.project_root)
        self.model_spec = {"name": m.name, "anchors": self.anchors, "num_classes": m.num_classes,
                           "input_size": m.input_size, "kwargs": dict(m.kwargs)}  # fmt: skip
        self.model = build_model_from_spec(self.model_spec)
        if self.dist.enabled and cfg.ddp.sync_bn:
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.channels_last = cfg.loader.channels_last and self.device.type == "cuda"
        self.model = self.model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.task = build_task(self.model, loss=asdict(cfg.loss)).to(self.device)
        if self.dist.enabled and "segm" in self.task.iou_types:
            raise ConfigError(f"model.name={m.name}: multi-process training covers the region (YOLOv2-family) "
                              "models; train this one in one process (python -m train)")  # fmt: skip
        if cfg.cuda_graph:
            self._check_cuda_graph()
        self.train_set, self.val_set = build_datasets(cfg.data, input_size=m.input_size, aug=asdict(cfg.aug),
                                                      seed=cfg.seed, project_root=self.project_root,
                                                      masks="segm" in self.task.iou_types)  # fmt: skip
        if len(self.train_set) == 0:
            raise ValueError("the training split has no images; check data.root and data.train")
        self.quant = self._start_qat() if cfg.quant.enabled else None  # before the optimizer and the EMA copy
        o = cfg.optim
        self.optimizer = build_optimizer(self.model, name=o.name, lr=o.lr, weight_decay=o.weight_decay,
                                         momentum=o.momentum, fused=o.fused)  # fmt: skip
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.rank_batch = cfg.batch_size // self.dist.world_size  # batch_size is the global batch
        shown = sum(r.repeat for r in self.train_set.records)  # images per epoch: a source's repeat counts
        steps = math.ceil(math.ceil(shown / self.dist.world_size) / self.rank_batch)
        self.steps_per_epoch = min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch > 0 else steps
        self.ema = None
        if o.ema_halflife_epochs > 0:
            # A half-life in epochs, not a fixed decay: 0.9999 would average a 1,000-step run's first, bad weights.
            decay = 0.5 ** (1.0 / (o.ema_halflife_epochs * self.steps_per_epoch))
            self.ema = ModelEMA(self.model, decay=decay, warmup=o.ema_warmup)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = max(1, int(o.warmup_epochs * self.steps_per_epoch))
        self.epoch, self.step, self.best_ap50, self.history = 0, 0, -1.0, []
        self._train_loader, self._sampler = None, None
        self._source: torch.Tensor | None = None  # loader.cache=device: the cached images on the device
        self.ddp_model = self.model  # what the training step calls: the model, its DDP wrapper or its CUDA graphs
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids)
        self._device_lock = threading.Lock()  # the batch prefetcher's CUDA calls never overlap a graph capture
        if cfg.cuda_graph:
            self.ddp_model = GraphedForward(self.model, amp=self.amp, capture_lock=self._device_lock)
        self.writer = None
        if cfg.tensorboard and self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))

    def _check_cuda_graph(self) -> None:
        """``cuda_graph=true`` where it cannot work is refused in one line, before any training."""
        why = None
        if self.device.type != "cuda":
            why = f"it needs a CUDA device (device={self.cfg.device} resolved to {self.device})"
        elif self.dist.enabled:
            why = "it is for one process (DDP's gradient hooks are not captured); drop it under torchrun"
        elif "segm" in self.task.iou_types:
            why = f"model.name={self.cfg.model.name}: its shapes change per image; it covers the region models"
        elif self.cfg.quant.enabled:
            why = "quant=qat fine-tunes with fake-quantization observers; train QAT eagerly"
        if why:
            raise ConfigError(f"cuda_graph=true is not possible here: {why}; set cuda_graph=false")

    # -- checkpoints -------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model_spec,
            "model_state": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "ema_updates": self.ema.updates if self.ema else 0,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best_ap50": self.best_ap50,
            "history": self.history,
            "rng": {
                "python": random.getstate(),
                "numpy": numpy_rng_to_plain(np.random.get_state()),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },  # fmt: skip
            "config": _to_container(self.cfg),
            "quant": self.quant,
        }

    def _start_qat(self) -> dict[str, Any]:
        """Fake quantization for a QAT run: on resume the run's own ranges (no recalibration), else ``init_from``'s
        weights calibrated as the INT8 export would (:mod:`sidnet.quant.qat`)."""
        from sidnet.export.adapters import adapter_for
        from sidnet.quant import qat

        adapter = adapter_for(self.model)
        if "int8" not in adapter.precisions:  # QAT fine-tunes for the INT8 export: pointless where there is none
            raise ValueError(f"quant=qat fine-tunes for an INT8 export, and {adapter.family} exports in "
                             f"{', '.join(adapter.precisions)} only: drop quant=qat")  # fmt: skip
        q = self.cfg.quant
        if self.cfg.resume:
            last = self.run_dir / "last.pt"
            quant = load_checkpoint(last).get("quant")
            if not quant:
                raise CheckpointError(f"{last} is not a QAT run (no quant ranges in it): drop quant=qat to continue "
                                      "it, or pass a new name= for the QAT run")  # fmt: skip
            qat.insert_quantizers(self.model, quant["amax"], quant["weights"])
            return quant
        digest = qat.load_init_weights(self.model, path=q.init_from, spec=self.model_spec)
        cset, source = self._calibration_set()
        return qat.prepare(self.model, cset=cset, source=source, method=q.calib_method, percentile=q.percentile,
                           init_from={"path": str(q.init_from), "sha256": digest})  # fmt: skip

    def _calibration_set(self):
        from sidnet.quant.calibration import CalibrationSet, calibration_set

        q, size = self.cfg.quant, self.cfg.model.input_size
        if q.calib_data or q.calib_images:
            return calibration_set(images=q.calib_images, data=q.calib_data, split=q.calib_split, size=size,
                                   batches=q.calib_batches, batch_size=q.calib_batch_size,
                                   project_root=self.project_root)  # fmt: skip
        records = load_records(self.cfg.data, q.calib_split, project_root=self.project_root)
        return (CalibrationSet([r.path for r in records], size=size, batch_size=q.calib_batch_size,
                               batches=q.calib_batches), f"this run's data split {q.calib_split}")  # fmt: skip

    def resume(self, path: Path) -> None:
        state = load_checkpoint(path)
        if state["model"]["name"] != self.model_spec["name"] or state["model"]["anchors"] != self.anchors:
            raise CheckpointError(f"{path} was trained as {state['model']['name']} with anchors "
                                  f"{state['model']['anchors']}, not as configured now; use a new name= or the "
                                  "original model/anchors")  # fmt: skip
        if bool(state.get("quant")) != (self.quant is not None):
            kind = "a QAT run: resume it with quant=qat" if state.get("quant") else "not a QAT run: drop quant=qat"
            raise CheckpointError(f"{path} is {kind} (or start a new name=)")
        self.model.load_state_dict(state["model_state"])
        if self.ema and state["ema"] is not None:
            self.ema.module.load_state_dict(state["ema"])
            self.ema.updates = state["ema_updates"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.best_ap50, self.history = state["best_ap50"], state["history"]
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(numpy_rng_from_plain(rng["numpy"]))
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        log.info("resumed from %s at epoch %d (step %d)", path, self.epoch, self.step)

    def _save(self, state: dict[str, Any], path: Path) -> None:
        try:
            save_checkpoint(state, path)
        except OSError as e:
            kept = f"{path} from the last complete epoch is intact" if path.exists() else "no checkpoint was written"
            raise CheckpointError(f"could not write {path} ({e.strerror or e}); {kept}; free space or fix the folder "
                                  "and rerun with resume=true") from e  # fmt: skip

    # -- loop --------------------------------------------------------------------------------------------------
    def _loader(self, epoch: int) -> DataLoader:
        # Order and augmentation of epoch e depend only on (seed, e) through the sampler, not on worker state, so a
        # resumed run replays them exactly and workers can persist across epochs (tiny epochs were spawn-bound).
        if self._train_loader is None:
            lc, w = self.cfg.loader, self.cfg.workers
            dataset = train_dataset_for_loader(self.train_set, cache=lc.cache, cache_dir=Path(lc.cache_dir),
                                               gpu_aug=lc.gpu_aug, aug=asdict(self.cfg.aug),
                                               threads=os.cpu_count() or 1)  # fmt: skip
            if dataset.on_device:  # before the workers fork: they then carry boxes only
                self._source = dataset.take_device_images(self.device)
            self._train_loader, self._sampler = build_train_loader(
                dataset, batch_size=self.rank_batch, seed=self.cfg.seed, workers=w, rank=self.dist.rank,
                world_size=self.dist.world_size, pin_memory=lc.pin_memory and self.device.type == "cuda",
                prefetch_factor=lc.prefetch_factor, persistent_workers=lc.persistent_workers,
                worker_init_fn=_seed_worker)  # fmt: skip
        self._sampler.set_epoch(epoch)
        return self._train_loader

    def train_one_epoch(self) -> dict[str, float]:
        cfg, o = self.cfg, self.cfg.optim
        self.model.train()
        if self.quant is not None and cfg.quant.freeze_bn:
            from sidnet.quant.qat import freeze_norm

            freeze_norm(self.model)
        # closing() stops a prefetching thread when the loop ends, breaks or raises, not when the generator is collected
        with contextlib.closing(self._device_batches(self.epoch)) as batches:
            bar = progress(batches, total=self.steps_per_epoch, unit="step", enabled=self.dist.is_main,
                           desc=f"epoch {self.epoch + 1}/{cfg.epochs}")  # fmt: skip
            sums: dict[str, float] = {}
            seen, t0, first_loss, pending = 0, time.perf_counter(), None, None
            image_ids: list[int] | None = [] if log.isEnabledFor(logging.DEBUG) else None
            for i, (images, targets) in enumerate(bar):
                if i >= self.steps_per_epoch:
                    break
                lr = o.lr * lr_factor(self.step, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                                      min_ratio=o.min_lr_ratio)  # fmt: skip
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                if image_ids is not None:
                    image_ids.extend(t["image_id"] for t in targets)
                loss, parts = self.train_step(images, targets)
                self.step += 1
                seen += images.shape[0]
                # The step's numbers reach the host one step late (an async copy and an event), so the CPU queues step
                # i+1 while the GPU runs step i instead of draining the GPU at every step with .item().
                staged = _stage(torch.stack([loss.detach(), *(v.detach() for v in parts.values())]).float())
                if pending:
                    self._account(pending, sums, lr=lr, seen=seen, t0=t0, bar=bar)
                pending = (staged, ["loss", *parts], self.step - 1)
                if first_loss is None:
                    first_loss = staged
        if pending:
            self._account(pending, sums, lr=lr, seen=seen, t0=t0, bar=bar)
        first_loss = _read(first_loss)[0] if first_loss is not None else None
        n = max(1, min(i + 1, self.steps_per_epoch))
        stats = all_reduce_mean({**{k: v / n for k, v in sums.items()}, "first_step_loss": first_loss}, self.dist)
        stats.update(img_per_s=seen * self.dist.world_size / (time.perf_counter() - t0), lr=lr)
        if image_ids is not None:
            log.debug("rank %d epoch %d image ids %s", self.dist.rank, self.epoch + 1, json.dumps(image_ids))
        return stats

    def _device_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, list[dict[str, Any]]]]:
        """Epoch ``epoch``'s batches on the device, augmented (``gpu_aug``) and rescaled (``aug.multiscale``), as
        :meth:`_device_batch` makes them; with ``loader.device_prefetch`` (``null``: on CUDA) made ahead by a background
        thread."""
        loader, prepare = self._loader(epoch), functools.partial(self._device_batch, epoch=epoch)
        prefetch = self.cfg.loader.device_prefetch
        if prefetch or (prefetch is None and self.device.type == "cuda"):
            return iter(DevicePrefetcher(loader, prepare, device=self.device, lock=self._device_lock))
        return (prepare(i, batch) for i, batch in enumerate(loader))

    def _device_batch(self, index: int, batch, *, epoch: int) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Batch ``index`` of epoch ``epoch`` from the loader → the step's device images and targets (a profiler range,
        ``batch/prepare``, as the step's phases are)."""
        with record_function("batch/prepare"):
            images, targets = to_device(*batch, device=self.device, channels_last=self.channels_last,
                                        source=self._source)  # fmt: skip
            aug = self.cfg.aug
            if aug.multiscale:  # one input size per batch, from (seed, epoch, batch index): resume stays exact
                size = multiscale_size(seed=self.cfg.seed, epoch=epoch, index=index, low=aug.multiscale[0],
                                       high=aug.multiscale[1])  # fmt: skip
                images, targets = rescale_batch(images, targets, size=size)
        return images, targets

    def train_step(self, images: torch.Tensor, targets: list[dict[str, Any]]) -> tuple[torch.Tensor, dict]:
        """One optimisation step on a device batch: loss under AMP, scaled backward, optional gradient clipping,
        optimizer and scaler, EMA. Each phase is a profiler range (``step/...``; benchmarks/loader_throughput.py
        reads them). Returns the loss and its parts, still on the device."""
        with record_function("step/forward+loss"):
            loss, parts = self.task.loss(self.ddp_model, images, targets, amp=self.amp)
        with record_function("step/backward"):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        with record_function("step/optimizer"):
            if self.cfg.optim.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.ema:
            with record_function("step/ema"):
                self.ema.update(self.model)
        return loss, parts

    def _account(self, pending, sums: dict[str, float], *, lr: float, seen: int, t0: float, bar) -> None:
        """Add a finished step's loss and parts (from :func:`_stage`) to ``sums``; raise on a non-finite loss."""
        staged, names, step = pending
        values = _read(staged)
        if not math.isfinite(values[0]):
            raise FloatingPointError(f"loss is {values[0]} at epoch {self.epoch + 1} step {step}; lower optim.lr or "
                                     "check the data (boxes, anchors)")  # fmt: skip
        for k, v in zip(names, values, strict=True):
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{values[0]:.3f}", lr=f"{lr:.2e}", img_s=f"{seen / (time.perf_counter() - t0):.1f}")
        if self.writer:
            self.writer.add_scalar("train/lr", lr, step)
            for k, v in zip(names, values, strict=True):
                self.writer.add_scalar(f"train/{k}", v, step)

    def evaluate(self) -> dict[str, Any]:
        model = self.ema.module if self.ema else self.model
        e = self.cfg.eval
        preds, masks = predict_dataset(model, self.val_set, task=self.task, device=self.device,
                                       batch_size=self.cfg.batch_size, conf_thresh=e.conf_thresh, nms_iou=e.nms_iou,
                                       max_det=e.max_det, amp=self.amp,
                                       desc=f"validation {self.epoch}/{self.cfg.epochs}")  # fmt: skip
        report = evaluate_by_source(self.val_set.records, preds, operating_conf=e.operating_conf, masks=masks)
        for name, r in report.get("per_source", {}).items():
            log.info("val %s: AP50 %.4f AP %.4f AP_small %s recall@%.2g %.4f", name, r["AP50"] or 0, r["AP"] or 0,
                     r["AP_small"] if r["AP_small"] is None else round(r["AP_small"], 4), e.operating_conf,
                     r["recall"])  # fmt: skip
        if self.writer:
            keys = ("AP", "AP50", "AP75", "AP_small", "recall", "recall_small", "precision", "fp_per_negative_image",
                    "segm_AP", "segm_AP50")  # fmt: skip
            for prefix, r in [("val", report), *((f"val_{n}", r) for n, r in report.get("per_source", {}).items())]:
                for k in keys:
                    if isinstance(r.get(k), (int, float)):
                        self.writer.add_scalar(f"{prefix}/{k}", r[k], self.epoch)
            self._log_sample_image(model)
        return report

    def _log_sample_image(self, model: torch.nn.Module) -> None:
        from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

        idx = next((i for i, r in enumerate(self.val_set.records) if len(r.boxes)), 0)
        image, target = self.val_set[idx]
        e = self.cfg.eval
        with torch.no_grad():
            model.eval()
            det = self.task.predict(model, image[None].to(self.device), conf_thresh=e.operating_conf,
                                    nms_iou=e.nms_iou, max_det=e.max_det, amp=False)[0]  # fmt: skip
        det = {k: v.cpu() for k, v in det.items()}
        canvas = (image * 255).to(torch.uint8)
        if "masks" in det and len(det["masks"]):
            canvas = draw_segmentation_masks(canvas, det["masks"] >= 0.5, alpha=0.4, colors="red")
        if len(target["boxes"]):
            canvas = draw_bounding_boxes(canvas, target["boxes"], colors="lime", width=1)
        if len(det["boxes"]):
            canvas = draw_bounding_boxes(canvas, det["boxes"], labels=[f"{s:.2f}" for s in det["scores"].tolist()],
                                         colors="red", width=2)  # fmt: skip
        self.writer.add_image("val/sample (green: truth, red: predicted @0.3)", canvas, self.epoch)

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        last, best = self.run_dir / "last.pt", self.run_dir / "best.pt"
        report: dict[str, Any] = {}
        main = self.dist.is_main
        while self.epoch < cfg.epochs:
            stats = self.train_one_epoch()
            self.epoch += 1
            if main and (self.epoch % cfg.eval.every == 0 or self.epoch == cfg.epochs):
                report = self.evaluate()
                stats.update({f"val_{k}": report[k] for k in ("AP", "AP50", "recall", "precision", "segm_AP",
                                                               "segm_AP50") if k in report})  # fmt: skip
                if (report.get("AP50") or 0.0) > self.best_ap50:
                    self.best_ap50 = report["AP50"]
                    # EMA weights only (conv weights in fp16 outside QAT): a third of last.pt, see deploy_state
                    self._save(deploy_state({**self.state(), "metrics": report}, half=self.quant is None), best)
            self.history.append({"epoch": self.epoch, **stats})
            if main:
                log.info("epoch %d/%d %s", self.epoch, cfg.epochs, json.dumps(_round(stats)))
                self._save(self.state(), last)
                log.debug("rank %d wrote %s", self.dist.rank, last)
            self.dist.barrier()  # the others wait while rank 0 evaluates and writes
        if self.writer:
            self.writer.close()
        return {"epochs": self.epoch, "steps": self.step, "best_ap50": self.best_ap50, "last": str(last),
                "best": str(best) if best.exists() else None, "history": self.history, "report": report}  # fmt: skip


def _stage(values: torch.Tensor):
    """Start copying a 1-D device tensor to the host without waiting; :func:`_read` gets the list."""
    if values.device.type != "cuda":
        return values, None
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def _read(staged) -> list[float]:
    host, done = staged
    if done is not None:
        done.synchronize()  # waits for that step only, not for the steps queued after it
    return host.tolist()


def _round(d: dict) -> dict:
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in d.items()}


def _to_container(cfg: TrainConfig) -> dict:
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    except ImportError:
        return asdict(cfg)


def check_train_config(cfg: TrainConfig, *, project_root: Path) -> None:
    """Every check that needs no data: value ranges, the data splits' keys, the anchors (file, shape, count) and the
    device."""
    validate_train_config(cfg)
    for split in ("train", "val"):
        data_sources(cfg.data, split, project_root=project_root)
    if cfg.model.anchors is not None:  # null: the model has no anchor list (maskrcnn: RPN anchors per FPN level)
        anchors = load_anchors(cfg.model.anchors, project_root=project_root)
        validate_anchors(anchors, num_anchors=cfg.model.num_anchors, source=cfg.model.anchors)
    resolve_device(cfg.device)


def check_run_dir(run_dir: Path, *, resume: bool) -> Path:
    """``run_dir/last.pt``, after refusing to start over an existing run without ``resume`` (or to resume none)."""
    last = Path(run_dir) / "last.pt"
    if last.exists() and not resume:
        raise FileExistsError(f"{last} exists: pass resume=true to continue that run, or name=<new> to start another")
    if resume and not last.exists():
        raise FileNotFoundError(f"resume=true but {last} does not exist; drop resume or fix name=")
    return last


def train(cfg: TrainConfig, *, run_dir: Path, project_root: Path, dist: DistContext | None = None) -> dict[str, Any]:
    """Train one run in ``run_dir``. An existing ``last.pt`` there is continued with ``cfg.resume``, and is never
    overwritten without it. ``dist``: this process's rank in a multi-process run; rank 0 holds the run folder's lock
    and writes, every rank reads ``last.pt`` to resume."""
    check_train_config(cfg, project_root=project_root)
    dist = dist or DistContext()
    run_dir = claim_run_dir(run_dir) if dist.is_main else Path(run_dir)
    # A second training into the same folder refuses here, before touching it.
    held = acquire_run_lock(run_dir) if dist.is_main else None
    try:
        if dist.is_main:
            for stale in remove_stale_temporaries(run_dir):
                log.warning("removed %s, left by a writer that was killed mid-write", stale.name)
        last = check_run_dir(run_dir, resume=cfg.resume)
        trainer = Trainer(cfg, run_dir=run_dir, project_root=project_root, dist=dist)
        if cfg.resume:
            trainer.resume(last)
        return trainer.fit()
    finally:
        if held is not None:
            release_run_lock(held)
