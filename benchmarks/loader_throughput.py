"""Loader-only and training img/s for each loader option, side by side, in one run (CPU or GPU).

For each option: (1) **loader only**: the training DataLoader over ``--epochs`` epochs, every batch moved to the device
and made float (and batch-augmented with gpu_aug), synchronised; (2) **training**: the real
:class:`sidnet.engine.trainer.Trainer` (model, region loss, AdamW, AMP on CUDA, EMA) for ``--epochs`` epochs. Epoch 1
is reported apart (wall clock from the loader's creation: cache build and worker start-up included), the later
epochs as the steady rate. Options:

    legacy   the loader before this change: float32 tensors from the workers, decode + letterbox + albumentations
    none     uint8 from the workers, divided on the device (loader.cache=none)
    ram      + loader.cache=ram          disk  + loader.cache=disk (a second run: the .npy is reused)
    gpu      loader.gpu_aug=true (no cache)          gpu_ram  gpu_aug + cache=ram
    gpu_ram_cl  gpu_aug + cache=ram + channels_last
    device   gpu_aug + cache=device (images, mosaics and augmentation on the GPU; workers send indices and boxes)
    device_cl   the same + channels_last

and a last row, **GPU bound**: the same training step on one batch already on the device, repeated (no loader at
all): the rate the GPU alone sets, so the table shows how far each loader option leaves training from it.

    # GPU machine (16 cores): SIDNet-MobileNetV2, 416², batch 64, AMP, 14 workers, capston2 train (1,836 images)
    python benchmarks/loader_throughput.py --root .devdata_ddp/capston2 --workers 14 --batch 64 \
        --out benchmarks/results/loader_throughput_h200.md
    # this CPU (small): python benchmarks/loader_throughput.py --size 224 --batch 8 --workers 2 --steps 6 \
        --options legacy none ram gpu_ram --out benchmarks/results/loader_throughput_cpu.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from sidnet.config import AugConfig, DataConfig, LoaderConfig, ModelConfig, TrainConfig
from sidnet.data import collate
from sidnet.engine.loader import build_train_loader, to_device, train_dataset_for_loader
from sidnet.engine.trainer import Trainer, _seed_worker
from sidnet.environment import environment, publish_report

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {
    "legacy": ("landed loader: float32 from workers", {}),
    "none": ("uint8 batches, cache=none", {"cache": "none"}),
    "ram": ("uint8, cache=ram", {"cache": "ram"}),
    "disk": ("uint8, cache=disk (reused)", {"cache": "disk"}),
    "gpu": ("gpu_aug, cache=none", {"cache": "none", "gpu_aug": True}),
    "gpu_ram": ("gpu_aug + cache=ram", {"cache": "ram", "gpu_aug": True}),
    "gpu_ram_cl": ("gpu_aug + cache=ram + channels_last", {"cache": "ram", "gpu_aug": True, "channels_last": True}),
    "device": ("gpu_aug + cache=device", {"cache": "device", "gpu_aug": True}),
    "device_cl": ("gpu_aug + cache=device + channels_last", {"cache": "device", "gpu_aug": True,
                                                             "channels_last": True}),
}


def train_config(args, loader: dict, cache_dir: str) -> TrainConfig:
    split = {"format": "yolo", "images": args.images, "labels": args.labels}
    kwargs = {"pretrained": None, "head_channels": 512} if args.model == "sidnet_mobilenetv2" else {"width": 0.25}
    return TrainConfig(
        model=ModelConfig(name=args.model, anchors="conf/anchors/coco128_person.yaml", input_size=args.size,
                          kwargs=kwargs),  # fmt: skip
        data=DataConfig(root=str(Path(args.root).resolve()), train=split, val=split, negative_ratio=-1.0),
        aug=AugConfig(mosaic=args.mosaic), loader=LoaderConfig(**{"cache_dir": cache_dir, **loader}),
        batch_size=args.batch, workers=args.workers, device=args.device, amp=True, tensorboard=False,
        epochs=args.epochs, max_steps_per_epoch=args.steps,
    )  # fmt: skip


def rates(per_epoch: list[tuple[int, float]]) -> tuple[float, float]:
    """(first epoch img/s, median of the later epochs' img/s) from (images, seconds) per epoch."""
    first = per_epoch[0][0] / per_epoch[0][1]
    later = [n / s for n, s in per_epoch[1:]] or [first]
    return first, statistics.median(later)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(key: str, args, cache_dir: str) -> dict:
    legacy = key == "legacy"
    cfg = train_config(args, {} if legacy else OPTIONS[key][1], cache_dir)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir=Path(run_dir), project_root=ROOT)
        device, lc = trainer.device, cfg.loader
        # (1) loader only: its own loader, so the training below starts from cold workers as a run does.
        t0 = time.perf_counter()
        if legacy:
            dataset = trainer.train_set
        else:
            dataset = train_dataset_for_loader(trainer.train_set, cache=lc.cache, cache_dir=Path(cache_dir),
                                               gpu_aug=lc.gpu_aug, aug=asdict(cfg.aug),
                                               threads=args.threads)  # fmt: skip
        loader, sampler = build_train_loader(dataset, batch_size=cfg.batch_size, seed=0, workers=cfg.workers,
                                             pin_memory=device.type == "cuda", prefetch_factor=lc.prefetch_factor,
                                             worker_init_fn=_seed_worker,
                                             collate_fn=collate if legacy else None)  # fmt: skip
        source = dataset.take_device_images(device) if getattr(dataset, "on_device", False) else None
        loader_epochs = []
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            n = 0
            for i, (images, targets) in enumerate(loader):
                if args.steps and i >= args.steps:
                    break
                x, _ = to_device(images, targets, device=device, channels_last=trainer.channels_last, source=source)
                n += x.shape[0]
            sync(device)
            loader_epochs.append((n, time.perf_counter() - t0))
            t0 = time.perf_counter()
        del loader, source
        # (2) training through the Trainer (its own loader, built inside epoch 1's wall clock).
        if legacy:  # the landed path: the plain float32 dataset behind the same sampler, per-image target dicts
            trainer._train_loader, trainer._sampler = build_train_loader(
                trainer.train_set, batch_size=cfg.batch_size, seed=0, workers=cfg.workers,
                pin_memory=device.type == "cuda", worker_init_fn=_seed_worker, collate_fn=collate)  # fmt: skip
        train_epochs, images_per_epoch = [], min(len(trainer.train_set), trainer.steps_per_epoch * cfg.batch_size)
        for _ in range(args.epochs):
            t0 = time.perf_counter()
            trainer.train_one_epoch()
            sync(device)
            train_epochs.append((images_per_epoch, time.perf_counter() - t0))
            trainer.epoch += 1
        del trainer
    lf, ls = rates(loader_epochs)
    tf, ts = rates(train_epochs)
    return {"option": key, "label": OPTIONS[key][0], "loader_first": lf, "loader_steady": ls, "train_first": tf,
            "train_steady": ts}  # fmt: skip


def gpu_bound(args, cache_dir: str, *, steps: int = 30) -> dict:
    """Training img/s with no loader: one batch moved to the device once, the Trainer's step repeated on it."""
    cfg = train_config(args, {"cache": "none", "channels_last": True}, cache_dir)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir=Path(run_dir), project_root=ROOT)
        dataset = train_dataset_for_loader(trainer.train_set, cache="none", cache_dir=None, gpu_aug=False,
                                           aug=asdict(cfg.aug), threads=args.threads)  # fmt: skip
        loader, _ = build_train_loader(dataset, batch_size=cfg.batch_size, seed=0, workers=0)
        images, targets = to_device(*next(iter(loader)), device=trainer.device, channels_last=trainer.channels_last)
        model, opt, scaler = trainer.ddp_model, trainer.optimizer, trainer.scaler
        model.train()
        rates_ = []
        for _ in range(2):  # the first repetition warms cuDNN's autotuner up
            sync(trainer.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                loss, _ = trainer.task.loss(model, images, targets, amp=trainer.amp)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                if trainer.ema:
                    trainer.ema.update(trainer.model)
            sync(trainer.device)
            rates_.append(steps * images.shape[0] / (time.perf_counter() - t0))
    nan = float("nan")
    return {"option": "gpu_bound", "label": "no loader: one device batch, training step repeated", "loader_first": nan,
            "loader_steady": nan, "train_first": rates_[0], "train_steady": rates_[1]}  # fmt: skip


def _rate(v: float) -> str:
    if v != v:
        return "–"
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(ROOT.parent / "shared/data/capston2"), help="YOLO dataset root")
    p.add_argument("--images", default="images/train")
    p.add_argument("--labels", default="labels/boxes/train")
    p.add_argument("--model", default="sidnet_mobilenetv2")
    p.add_argument("--size", type=int, default=416)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=14)
    p.add_argument("--threads", type=int, default=16, help="threads that build a cache")
    p.add_argument("--epochs", type=int, default=3, help="epoch 1 reported apart; the rest: the steady rate")
    p.add_argument("--steps", type=int, default=0, help="cap on batches per epoch (0: whole epochs)")
    p.add_argument("--mosaic", type=float, default=0.5, help="aug.mosaic (the default augmentation's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    p.add_argument("--no-gpu-bound", action="store_true", help="skip the no-loader row")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        if "disk" in args.options:  # "reused": build the .npy once before timing, as a second run would find it
            measure_cfg = train_config(args, {"cache": "disk"}, cache_dir)
            from sidnet.data.loading import load_records
            from sidnet.engine.loader import ImageCache

            ImageCache.build(load_records(measure_cfg.data, "train", project_root=ROOT), size=args.size, mode="disk",
                             cache_dir=Path(cache_dir), threads=args.threads)  # fmt: skip
        for key in args.options:
            rows.append(measure(key, args, cache_dir))
            r = rows[-1]
            print(f"{key}: loader {r['loader_first']:.0f} / {r['loader_steady']:.0f} img/s, training "
                  f"{r['train_first']:.0f} / {r['train_steady']:.0f} img/s (epoch 1 / steady)", flush=True)  # fmt: skip
        if not args.no_gpu_bound:
            rows.append(gpu_bound(args, cache_dir))
            print(f"gpu_bound: training {rows[-1]['train_steady']:.0f} img/s", flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    env = environment(device)
    import albumentations
    import cv2

    base = rows[0]
    lines = [f"# Loader throughput ({env['date']})", "",
             f"Device: {env['device']}, {os.cpu_count()} CPU cores | torch {env['torch']} | CUDA {env['cuda']} | "
             f"Python {env['python']} | albumentations {albumentations.__version__} | OpenCV {cv2.__version__}", "",
             f"{args.model}, {args.size}², batch {args.batch}, AMP (CUDA), {args.workers} workers, aug=default + "
             f"mosaic {args.mosaic}, data {args.root} ({args.images}), {args.epochs} epochs"
             f"{f' of {args.steps} steps' if args.steps else ''} per option; epoch 1 from the loader's creation "
             "(cache build, worker start-up), steady = median of the later epochs.", "",
             f"Command: `{env['command']}`", "",
             f"| option | loader img/s (epoch 1) | loader img/s (steady) | training img/s (epoch 1) | "
             f"training img/s (steady) | training vs {base['option']} |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        rate = [_rate(r[k]) for k in ("loader_first", "loader_steady", "train_first", "train_steady")]
        lines.append(f"| {r['option']}: {r['label']} | {' | '.join(rate)} | "
                     f"{r['train_steady'] / base['train_steady']:.2f}x |")  # fmt: skip
    publish_report(lines, out=args.out, payload={"env": env, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
