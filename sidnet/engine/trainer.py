"""The training loop: AdamW/SGD, warm-up + cosine, AMP, EMA, gradient clipping, atomic checkpoints, resume,
TensorBoard, periodic COCO evaluation with the best checkpoint kept by AP50."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from sidnet.anchors import load_anchors
from sidnet.checkpoint import (
    CheckpointError,
    build_model_from_spec,
    load_checkpoint,
    numpy_rng_from_plain,
    numpy_rng_to_plain,
    save_checkpoint,
)
from sidnet.config import ConfigError, TrainConfig, validate_anchors, validate_train_config
from sidnet.data import SeededSampler, collate
from sidnet.data.loading import build_datasets, load_records
from sidnet.engine.ema import ModelEMA
from sidnet.engine.runlock import acquire_run_lock, release_run_lock
from sidnet.engine.tasks import build_task
from sidnet.evaluation import evaluate_detections
from sidnet.evaluation.predict import predict_dataset
from sidnet.io import remove_stale_temporaries
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


def build_optimizer(model: torch.nn.Module, *, name: str, lr: float, weight_decay: float, momentum: float):
    """No weight decay on norm weights and biases (they are not scale-free parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    raise ValueError(f"unknown optimizer {name!r}; use optim=adamw or optim=sgd")


class Trainer:
    """Owns model, EMA, optimizer, scaler and loaders for one run directory. ``fit()`` → summary dict."""

    def __init__(self, cfg: TrainConfig, *, run_dir: Path, project_root: Path) -> None:
        self.cfg, self.run_dir, self.project_root = cfg, claim_run_dir(run_dir), Path(project_root)
        self.device = resolve_device(cfg.device)
        self.amp = cfg.amp and self.device.type == "cuda"
        seed_everything(cfg.seed)
        m = cfg.model
        self.anchors = None if m.anchors is None else load_anchors(m.anchors, project_root=self.project_root)
        self.model_spec = {"name": m.name, "anchors": self.anchors, "num_classes": m.num_classes,
                           "input_size": m.input_size, "kwargs": dict(m.kwargs)}  # fmt: skip
        self.model = build_model_from_spec(self.model_spec).to(self.device)
        self.task = build_task(self.model, loss=asdict(cfg.loss)).to(self.device)
        self.train_set, self.val_set = build_datasets(cfg.data, input_size=m.input_size, aug=dict(cfg.aug),
                                                      seed=cfg.seed, project_root=self.project_root,
                                                      masks="segm" in self.task.iou_types)  # fmt: skip
        if len(self.train_set) == 0:
            raise ValueError("the training split has no images; check data.root and data.train")
        self.quant = self._start_qat() if cfg.quant.enabled else None  # before the optimizer and the EMA copy
        o = cfg.optim
        self.optimizer = build_optimizer(self.model, name=o.name, lr=o.lr, weight_decay=o.weight_decay,
                                         momentum=o.momentum)  # fmt: skip
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        steps = math.ceil(len(self.train_set) / cfg.batch_size)
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
        self.writer = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))

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
            "rng": {"python": random.getstate(), "numpy": numpy_rng_to_plain(np.random.get_state()),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},  # fmt: skip
            "config": _to_container(self.cfg),
            "quant": self.quant,
        }

    def _start_qat(self) -> dict[str, Any]:
        """Fake quantization for a QAT run: on resume the run's own ranges (no recalibration), else ``init_from``'s
        weights calibrated as the INT8 export would (:mod:`sidnet.quant.qat`)."""
        from sidnet.quant import qat

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
            self._sampler = SeededSampler(len(self.train_set), seed=self.cfg.seed)
            w = self.cfg.workers
            self._train_loader = DataLoader(self.train_set, batch_size=self.cfg.batch_size, sampler=self._sampler,
                                            num_workers=w, collate_fn=collate, worker_init_fn=_seed_worker,
                                            pin_memory=self.device.type == "cuda", persistent_workers=w > 0,
                                            prefetch_factor=4 if w > 0 else None)  # fmt: skip
        self._sampler.set_epoch(epoch)
        return self._train_loader

    def train_one_epoch(self) -> dict[str, float]:
        cfg, o = self.cfg, self.cfg.optim
        self.model.train()
        if self.quant is not None and cfg.quant.freeze_bn:
            from sidnet.quant.qat import freeze_norm

            freeze_norm(self.model)
        bar = tqdm(self._loader(self.epoch), total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                   dynamic_ncols=True, leave=False, disable=None)  # fmt: skip
        sums: dict[str, float] = {}
        seen, t0, first_loss = 0, time.perf_counter(), None
        for i, (images, targets) in enumerate(bar):
            if i >= self.steps_per_epoch:
                break
            lr = o.lr * lr_factor(self.step, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                                  min_ratio=o.min_lr_ratio)  # fmt: skip
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            images = images.to(self.device, non_blocking=True)
            loss, parts = self.task.loss(self.model, images, targets, amp=self.amp)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {self.epoch + 1} step {self.step}; lower "
                                         "optim.lr or check the data (boxes, anchors)")  # fmt: skip
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if o.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema:
                self.ema.update(self.model)
            self.step += 1
            seen += images.shape[0]
            first_loss = loss.item() if first_loss is None else first_loss
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            ips = seen / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
            if self.writer:
                self.writer.add_scalar("train/loss", loss.item(), self.step)
                self.writer.add_scalar("train/lr", lr, self.step)
                for k, v in parts.items():
                    self.writer.add_scalar(f"train/{k}", float(v.detach()), self.step)
        n = max(1, min(i + 1, self.steps_per_epoch))
        stats = {k: v / n for k, v in sums.items()}
        stats.update(first_step_loss=first_loss, img_per_s=seen / (time.perf_counter() - t0), lr=lr)
        return stats

    def evaluate(self) -> dict[str, Any]:
        model = self.ema.module if self.ema else self.model
        e = self.cfg.eval
        preds, masks = predict_dataset(model, self.val_set, task=self.task, device=self.device,
                                       batch_size=self.cfg.batch_size, conf_thresh=e.conf_thresh, nms_iou=e.nms_iou,
                                       max_det=e.max_det, amp=self.amp)  # fmt: skip
        report = evaluate_detections(self.val_set.records, preds, operating_conf=e.operating_conf, masks=masks)
        if self.writer:
            for k in ("AP", "AP50", "AP75", "recall", "precision", "fp_per_negative_image", "segm_AP", "segm_AP50"):
                if isinstance(report.get(k), (int, float)):
                    self.writer.add_scalar(f"val/{k}", report[k], self.epoch)
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
        while self.epoch < cfg.epochs:
            stats = self.train_one_epoch()
            self.epoch += 1
            if self.epoch % cfg.eval.every == 0 or self.epoch == cfg.epochs:
                report = self.evaluate()
                stats.update({f"val_{k}": report[k] for k in ("AP", "AP50", "recall", "precision") if k in report})
                if (report.get("AP50") or 0.0) > self.best_ap50:
                    self.best_ap50 = report["AP50"]
                    self._save({**self.state(), "metrics": report}, best)
            self.history.append({"epoch": self.epoch, **stats})
            log.info("epoch %d/%d %s", self.epoch, cfg.epochs, json.dumps(_round(stats)))
            self._save(self.state(), last)
        if self.writer:
            self.writer.close()
        return {"epochs": self.epoch, "steps": self.step, "best_ap50": self.best_ap50, "last": str(last),
                "best": str(best) if best.exists() else None, "history": self.history, "report": report}  # fmt: skip


def _round(d: dict) -> dict:
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in d.items()}


def _to_container(cfg: TrainConfig) -> dict:
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    except ImportError:
        return asdict(cfg)


def check_train_config(cfg: TrainConfig, *, project_root: Path) -> None:
    """Every check that needs no data: value ranges, the anchors (file, shape, count) and the device."""
    validate_train_config(cfg)
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


def train(cfg: TrainConfig, *, run_dir: Path, project_root: Path) -> dict[str, Any]:
    """Train one run in ``run_dir``. An existing ``last.pt`` there is continued with ``cfg.resume``, and is never
    overwritten without it."""
    check_train_config(cfg, project_root=project_root)
    run_dir = claim_run_dir(run_dir)
    held = acquire_run_lock(run_dir)  # a second training into the same folder refuses here, before touching it
    try:
        for stale in remove_stale_temporaries(run_dir):
            log.warning("removed %s, left by a writer that was killed mid-write", stale.name)
        last = check_run_dir(run_dir, resume=cfg.resume)
        trainer = Trainer(cfg, run_dir=run_dir, project_root=project_root)
        if cfg.resume:
            trainer.resume(last)
        return trainer.fit()
    finally:
        release_run_lock(held)
