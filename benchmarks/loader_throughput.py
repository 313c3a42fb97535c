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
    device_cl_graph  the same + cuda_graph=true (Trainer option: the network's training forward/backward as CUDA graphs)
    device_cl_graph_foreach  the same with optim.fused=false (the multi-tensor AdamW whose GradScaler step reads the
             overflow flag back every step; every other option uses the default, a fused AdamW on CUDA)

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

from sidnet.config import AugConfig, DataConfig, LoaderConfig, ModelConfig, OptimConfig, TrainConfig
from sidnet.data import collate
from sidnet.engine.graphs import GraphedForward
from sidnet.engine.loader import build_train_loader, to_device, train_dataset_for_loader
from sidnet.engine.trainer import Trainer, _seed_worker, build_optimizer
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
    "device_cl_graph": ("device_cl + cuda_graph=true (the network's forward/backward replayed as CUDA graphs)",
                        {"cache": "device", "gpu_aug": True, "channels_last": True, "cuda_graph": True}),
    "device_cl_prefetch": ("device_cl + loader.device_prefetch=true (the next batches prepared by a thread)",
                           {"cache": "device", "gpu_aug": True, "channels_last": True, "device_prefetch": True}),
    "device_cl_graph_prefetch": ("device_cl_graph + loader.device_prefetch=true",
                                 {"cache": "device", "gpu_aug": True, "channels_last": True, "cuda_graph": True,
                                  "device_prefetch": True}),
    "device_cl_graph_foreach": ("device_cl_graph with optim.fused=false (foreach AdamW: a host sync per step)",
                                {"cache": "device", "gpu_aug": True, "channels_last": True, "cuda_graph": True,
                                 "fused": False}),
}
TRAINER_KEYS = ("cuda_graph", "fused")  # an option's keys that are Trainer settings, not loader ones


def train_config(args, loader: dict, cache_dir: str) -> TrainConfig:
    loader = dict(loader)
    cuda_graph, fused = (loader.pop(k, None) for k in TRAINER_KEYS)
    split = {"format": "yolo", "images": args.images, "labels": args.labels}
    kwargs = {"pretrained": None, "head_channels": 512} if args.model == "sidnet_mobilenetv2" else {"width": 0.25}
    return TrainConfig(
        model=ModelConfig(name=args.model, anchors="conf/anchors/coco128_person.yaml", input_size=args.size,
                          kwargs=kwargs),  # fmt: skip
        data=DataConfig(root=str(Path(args.root).resolve()), train=split, val=split, negative_ratio=-1.0),
        aug=AugConfig(mosaic=args.mosaic),
        loader=LoaderConfig(**{"cache_dir": cache_dir, "device_prefetch": False, **loader}),  # inline unless named
        batch_size=args.batch, workers=args.workers, device=args.device, amp=True, tensorboard=False,
        epochs=args.epochs, max_steps_per_epoch=args.steps, cuda_graph=bool(cuda_graph),
        optim=OptimConfig(fused=fused),
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
        profiled = None
        if args.profile and device.type == "cuda" and not legacy:
            try:
                profiled = _profile_epoch(trainer)
            except Exception as e:  # noqa: BLE001  (a diagnostic: say why it is missing, keep the measured rates)
                print(f"{key}: end-to-end profile failed ({type(e).__name__}: {e})"[:300], flush=True)
        del trainer
    lf, ls = rates(loader_epochs)
    tf, ts = rates(train_epochs)
    row = {"option": key, "label": OPTIONS[key][0], "loader_first": lf, "loader_steady": ls, "train_first": tf,
           "train_steady": ts}  # fmt: skip
    if profiled:
        row["epoch_profile"] = profiled
    return row


def _kernels(events) -> list:
    """The profile's device-side events, minus the GPU copies of the record_function ranges (``step/``, ``batch/``,
    ``Optimizer.``: they span kernels, they are not work)."""
    from torch.autograd import DeviceType

    return [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
            and not e.name.startswith(("step/", "batch/", "Optimizer."))]  # fmt: skip


def _launched(e) -> list:
    """The kernels launched by this host range's ops, its whole subtree."""
    return list(getattr(e, "kernels", [])) + [k for c in e.cpu_children for k in _launched(c)]


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length (ms) of the union of (start, end) µs intervals: time the GPU ran at least one kernel."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e3


def _profile_epoch(trainer) -> dict:
    """One more training epoch under the profiler, end to end (loader, batch preparation, step): wall ms per step,
    the time the GPU ran at least one kernel (the union of kernel intervals over both streams, so overlap counts
    once) and the kernel ms of the batch preparation (``batch/prepare`` ranges, on whichever thread ran them) and of
    the step. GPU busy near the wall means the GPU sets the pace; well below it, the host does."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        trainer.train_one_epoch()
        sync(trainer.device)
        wall = time.perf_counter() - t0
    steps = trainer.steps_per_epoch
    events = prof.events()
    kernels = _kernels(events)
    prep = [k for e in events if e.name == "batch/prepare" and e.device_type == DeviceType.CPU for k in _launched(e)]
    spans = [(k.time_range.start, k.time_range.end) for k in kernels]
    kernel_ms = sum(b - a for a, b in spans) / 1e3
    prep_ms = sum(k.duration for k in prep) / 1e3
    return {"steps": steps, "wall_ms": wall * 1e3 / steps, "gpu_busy_ms": _union_ms(spans) / steps,
            "kernel_ms": kernel_ms / steps, "prepare_kernel_ms": prep_ms / steps,
            "step_kernel_ms": (kernel_ms - prep_ms) / steps, "prepare_kernels": len(prep) / steps}  # fmt: skip


def _profile(trainer, images, targets, *, steps: int) -> dict:
    """Where a GPU-bound step's time goes: wall ms per step, the GPU's kernel-busy ms per step (kernels of one step
    summed, overlap ignored), kernels launched per step, and each phase's host (CPU) ms and kernel ms. Wall well above
    kernel-busy means the host (Python, dispatch, launches) sets the pace, not the GPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    sync(trainer.device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(images, targets)
        sync(trainer.device)
        wall = time.perf_counter() - t0
    events = prof.events()
    kernels = _kernels(events)

    phases = {}
    for e in events:
        if e.name.startswith("step/") and e.device_type == DeviceType.CPU:
            ph = phases.setdefault(e.name[5:], {"host_ms": 0.0, "kernel_ms": 0.0, "kernels": 0.0})
            ks = _launched(e)
            ph["host_ms"] += e.time_range.elapsed_us() / 1e3 / steps
            ph["kernel_ms"] += sum(k.duration for k in ks) / 1e3 / steps
            ph["kernels"] += len(ks) / steps
    # autograd runs the backward ops on its own thread: their kernels are not under "step/backward"'s host range
    busy = sum(k.time_range.elapsed_us() for k in kernels) / 1e3 / steps
    if "backward" in phases:
        others = [v for k, v in phases.items() if k != "backward"]
        phases["backward"]["kernel_ms"] = busy - sum(v["kernel_ms"] for v in others)
        phases["backward"]["kernels"] = len(kernels) / steps - sum(v["kernels"] for v in others)
    # the network's forward alone (same AMP, grad on, output dropped): what of forward+loss is the loss
    with profile(activities=acts) as fwd:
        for _ in range(steps):
            with torch.autocast(trainer.device.type, enabled=trainer.amp), record_function("step/forward alone"):
                trainer.ddp_model(images)
        sync(trainer.device)
    alone = [e for e in fwd.events() if e.name == "step/forward alone" and e.device_type == DeviceType.CPU]
    fk = [k for e in alone for k in _launched(e)]
    phases["(network forward alone, a separate pass)"] = {
        "host_ms": sum(e.time_range.elapsed_us() for e in alone) / 1e3 / steps,
        "kernel_ms": sum(k.duration for k in fk) / 1e3 / steps, "kernels": len(fk) / steps}  # fmt: skip
    top = {}
    for k in kernels:
        top[k.name] = top.get(k.name, 0.0) + k.time_range.elapsed_us() / 1e3 / steps
    return {"steps": steps, "wall_ms": wall * 1e3 / steps,
            "kernel_busy_ms": busy,
            "kernels_per_step": len(kernels) / steps, "phases": phases,
            "top_kernels": sorted(top.items(), key=lambda kv: -kv[1])[:12]}  # fmt: skip


def gpu_bound(args, cache_dir: str, *, steps: int = 30) -> list[dict]:
    """Training img/s with no loader: one batch moved to the device once, the Trainer's step repeated on it; with
    ``args.profile`` also where its time goes (:func:`_profile`), for the Trainer's AdamW (fused on CUDA), for the
    multi-tensor one (``optim.fused=false``) and, on CUDA, with the network graphed. Each row
    runs :meth:`Trainer.train_step`, the step ``python -m train`` takes."""
    cfg = train_config(args, {"cache": "none", "channels_last": True}, cache_dir)
    rows = []
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir=Path(run_dir), project_root=ROOT)
        dataset = train_dataset_for_loader(trainer.train_set, cache="none", cache_dir=None, gpu_aug=False,
                                           aug=asdict(cfg.aug), threads=args.threads)  # fmt: skip
        loader, _ = build_train_loader(dataset, batch_size=cfg.batch_size, seed=0, workers=0)
        images, targets = to_device(*next(iter(loader)), device=trainer.device, channels_last=trainer.channels_last)
        trainer.ddp_model.train()
        # (option, label, the optimizer its steps use, what to do to the trainer first)
        rows_to_run = [("gpu_bound", "no loader: one device batch, training step repeated", trainer.optimizer, None)]
        if args.profile and trainer.device.type == "cuda":
            o = trainer.cfg.optim  # the Trainer's is fused on CUDA (optim.fused=null); the same groups, foreach
            foreach = build_optimizer(trainer.model, name=o.name, lr=o.lr, weight_decay=o.weight_decay,
                                      momentum=o.momentum, fused=False)  # fmt: skip
            rows_to_run += [("gpu_bound_foreach", "the same with optim.fused=false (a host sync per step)", foreach,
                             None),
                            ("gpu_bound_graphed", "cuda_graph=true: the network's forward/backward as CUDA graphs",
                             trainer.optimizer, _graph_network),
                            ("gpu_bound_graphed_foreach", "cuda_graph=true + optim.fused=false", foreach, None)]
        for key, label, opt, prepare in rows_to_run:
            trainer.optimizer = opt
            if prepare is not None:
                try:
                    prepare(trainer, images)
                except Exception as e:  # noqa: BLE001  (an experimental row: say why it is missing, keep the others)
                    rows.append(_gpu_row(key, f"{label}: failed ({type(e).__name__}: {e})"[:300]))
                    continue
            rates_ = []
            for _ in range(2):  # the first repetition warms cuDNN's autotuner up
                sync(trainer.device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    trainer.train_step(images, targets)
                sync(trainer.device)
                rates_.append(steps * images.shape[0] / (time.perf_counter() - t0))
            row = _gpu_row(key, label, first=rates_[0], steady=rates_[1])
            if args.profile:
                row["profile"] = _profile(trainer, images, targets, steps=min(steps, 10))
            rows.append(row)
    return rows


def _gpu_row(key: str, label: str, *, first: float = float("nan"), steady: float = float("nan")) -> dict:
    """A no-loader row of the table: training img/s only (the loader columns do not apply)."""
    return {"option": key, "label": label, "loader_first": float("nan"), "loader_steady": float("nan"),
            "train_first": first, "train_steady": steady}  # fmt: skip


def _graph_network(trainer, images: torch.Tensor) -> None:  # noqa: ARG001  (a row's prepare step)
    """What ``cuda_graph=true`` does to a Trainer (:class:`sidnet.engine.graphs.GraphedForward`): its training step's
    forward/backward is captured at the first call and replayed after (the rows' first repetition includes the
    capture). Every later row keeps it."""
    trainer.ddp_model = GraphedForward(trainer.model, amp=trainer.amp)


def profile_lines(rows: list[dict]) -> list[str]:
    """The profiled rows as a table: per step, wall vs GPU kernel-busy time and each phase's host/kernel ms."""
    out = []
    ends = [r for r in rows if r.get("epoch_profile")]
    if ends:
        out += ["", "### End to end: one more epoch under the profiler (loader, batch preparation, step)", "",
                "| option | wall ms/step | GPU busy ms/step (any kernel running) | busy / wall | kernel ms/step: "
                "batch preparation | kernel ms/step: step | preparation kernels/step |",
                "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in ends:
            e = r["epoch_profile"]
            out.append(f"| {r['option']} | {e['wall_ms']:.2f} | {e['gpu_busy_ms']:.2f} | "
                       f"{e['gpu_busy_ms'] / e['wall_ms']:.0%} | {e['prepare_kernel_ms']:.2f} | "
                       f"{e['step_kernel_ms']:.2f} | {e['prepare_kernels']:.0f} |")  # fmt: skip
    for r in rows:
        pr = r.get("profile")
        if not pr:
            continue
        out += ["", f"### Where a GPU-bound step goes: {r['option']} ({pr['steps']} profiled steps)", "",
                f"wall {pr['wall_ms']:.2f} ms/step, GPU kernels busy {pr['kernel_busy_ms']:.2f} ms/step "
                f"({pr['kernel_busy_ms'] / pr['wall_ms']:.0%}), {pr['kernels_per_step']:.0f} kernels/step", "",
                "| phase (backward kernels: the rest) | host ms/step | kernel ms/step | kernels/step |",
                "|---|---:|---:|---:|"]  # fmt: skip
        out += [f"| {k} | {v['host_ms']:.2f} | {v['kernel_ms']:.2f} | {v['kernels']:.0f} |"
                for k, v in pr["phases"].items()]  # fmt: skip
        out += ["", "| kernel (top 12) | ms/step |", "|---|---:|"]
        out += [f"| `{name[:90]}` | {ms:.3f} |" for name, ms in pr["top_kernels"]]
    return out


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
    p.add_argument("--profile", action="store_true",
                   help="profile the no-loader step (wall vs GPU-busy, per phase, top kernels) and, on CUDA, one more "
                   "end-to-end epoch per option (GPU busy vs wall, batch preparation vs step kernels); on CUDA adds a "
                   "foreach-AdamW row (optim.fused=false) and rows with the network graphed (cuda_graph=true)")
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
            for r in gpu_bound(args, cache_dir, steps=args.steps or 30):
                rows.append(r)
                print(f"{r['option']}: training {r['train_steady']:.0f} img/s", flush=True)
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
    lines += profile_lines(rows)
    publish_report(lines, out=args.out, payload={"env": env, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
