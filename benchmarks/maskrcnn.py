"""Mask R-CNN on the GPU: model img/s at the export size (eager FP32, FP16 + channels_last, compiled trunk) and the
pyramid RoIAlign kernel (csrc/roialign) against torchvision's MultiScaleRoIAlign; markdown table + JSON.

    python benchmarks/maskrcnn.py --images DIR [--checkpoint best.pt] [--size 512] --out DIR

Model timing: real images from ``--images`` (letterboxed to ``--size``), the trained checkpoint when given (the mask
head's cost follows the number of detections, so untrained weights would time something else), batches 1 and 8,
wall clock over ``--iters`` synchronised iterations after warm-up, median of 3 rounds. All variants run in this one
process, side by side; × is relative to eager FP32 at the same batch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from sidnet.checkpoint import load_checkpoint, model_from_checkpoint
from sidnet.data import letterbox
from sidnet.data.validate import list_images
from sidnet.models import build_model
from sidnet.runtime.benchmark import median_ms


def load_images(folder: Path, size: int, count: int) -> torch.Tensor:
    import cv2

    out = []
    for path in list_images(folder)[:count]:
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        image, _, _ = letterbox(rgb, [], size=size)
        out.append(torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def time_model(fn, batches: list[torch.Tensor], iters: int) -> float:
    """Images per second: median of 3 rounds of ``iters`` calls, each on the next batch, synchronised."""
    with torch.no_grad():
        for b in batches[:3]:
            fn(b)
        torch.cuda.synchronize()
        rates = []
        for _ in range(3):
            t0 = time.perf_counter()
            for i in range(iters):
                fn(batches[i % len(batches)])
            torch.cuda.synchronize()
            rates.append(iters * batches[0].shape[0] / (time.perf_counter() - t0))
    return statistics.median(rates)


def model_rows(model, images: torch.Tensor, iters: int, compile_trunk: bool, rows: list, done) -> list[dict]:
    fp32 = model.cuda().eval()
    variants = [("eager FP32", lambda b: fp32.detect(b), "float32")]

    def fp16(b):
        with torch.autocast("cuda", dtype=torch.float16):
            return fp32.detect(b.contiguous(memory_format=torch.channels_last))

    variants.append(("FP16 autocast + channels_last", fp16, "cl"))
    if compile_trunk:
        variants.append(("FP16 + channels_last + torch.compile(trunk+FPN)", fp16, "compile"))
    for name, fn, kind in variants:
        if kind == "cl":
            fp32.to(memory_format=torch.channels_last)
        if kind == "compile":
            t0 = time.perf_counter()
            fp32.net.backbone = torch.compile(fp32.net.backbone, dynamic=False)
            with torch.no_grad():
                fn(images[:1].cuda())
                fn(images[:8].cuda())
            print(f"compile: {time.perf_counter() - t0:.0f} s", flush=True)
        for bs in (1, 8):
            batches = [images[i : i + bs].cuda() for i in range(0, len(images) - bs + 1, bs)]
            rate = time_model(fn, batches, iters=max(4, iters // bs))
            rows.append({"variant": name, "batch": bs, "img_per_s": rate})
            print(f"{name:55s} bs {bs}: {rate:8.1f} img/s", flush=True)
            done()
    return rows


def roialign_rows(reps: int) -> list[dict]:
    from torchvision.ops import MultiScaleRoIAlign

    import sidnet.kernels as K

    rows = []
    for dtype in (torch.float32, torch.float16):
        for n, r, pooled in ((1, 1000, 7), (1, 100, 14), (8, 1000, 7), (8, 100, 14)):
            g = torch.Generator(device="cuda").manual_seed(0)
            size, c = 512, 256
            feats = [torch.randn(n, c, size // s, size // s, generator=g, device="cuda").to(dtype) for s in (8, 16, 32)]
            xy = torch.rand(n, r, 2, generator=g, device="cuda") * size * 0.8
            wh = torch.rand(n, r, 2, generator=g, device="cuda") ** 2 * size * 0.5 + 2
            rois = torch.cat([xy, (xy + wh).clamp(max=size)], -1)
            pool = MultiScaleRoIAlign(["0", "1", "2"], output_size=pooled, sampling_ratio=2)
            maps = {str(i): f for i, f in enumerate(feats)}
            shapes = [(size, size)] * n
            rois_t = list(rois.to(dtype))  # torchvision's roi_align wants the features' dtype for the boxes too
            calls = {  # called only within this iteration, so binding the loop's variables late is intended
                "torchvision MultiScaleRoIAlign": lambda: pool(maps, rois_t, shapes),  # noqa: B023
                "sidnet pyramidRoiAlign": lambda: K.pyramid_roi_align(  # noqa: B023
                    feats, rois, output_size=(pooled, pooled), sampling_ratio=2, scales=[1 / 8, 1 / 16, 1 / 32]),  # noqa: B023
            }  # fmt: skip
            base = None
            for name, fn in calls.items():
                us = median_ms(fn, reps=reps) * 1000
                base = base or us
                rows.append({"dtype": str(dtype).removeprefix("torch."), "n": n, "rois": r, "pooled": pooled,
                             "variant": name, "us": us, "speedup_vs_torchvision": base / us})  # fmt: skip
                print(f"roialign {dtype} n={n} r={r} {pooled}x{pooled} {name}: {us:.1f} us", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--iters", type=int, default=64)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.checkpoint:
        state = load_checkpoint(a.checkpoint)
        model, source = model_from_checkpoint(state), f"trained checkpoint {a.checkpoint}"
        size = state["model"]["input_size"]
    else:
        model, source, size = build_model("maskrcnn", input_size=a.size, pretrained=None), "random init", a.size
    images = load_images(a.images, size, 64)
    meta = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "input_size": size, "weights": source, "images": str(a.images)}  # fmt: skip
    roi = roialign_rows(a.reps)
    rows: list[dict] = []
    write(a.out, meta, rows, roi, size, source)
    model_rows(model, images, a.iters, compile_trunk=not a.no_compile, rows=rows,
               done=lambda: write(a.out, meta, rows, roi, size, source))


def write(out: Path, meta: dict, rows: list[dict], roi: list[dict], size: int, source: str) -> None:
    """Written after every measurement, so a run cut short by a time limit still leaves its figures."""
    a = argparse.Namespace(out=out, images=meta["images"])
    (a.out / "maskrcnn_h100.json").write_text(json.dumps({**meta, "model": rows, "roialign": roi}, indent=2) + "\n")
    lines = [f"# Mask R-CNN (MobileNetV2-FPN, person) — {meta['device']}", "",
             f"{meta['date']} · torch {meta['torch']} · Python {meta['python']} · input {size}² · {source} · "
             f"real images from {a.images}. Generated by `benchmarks/maskrcnn.py` (`benchmarks/run_gpu.sh "
             "bench-maskrcnn`).", "", "## Model img/s (× = vs eager FP32 at the same batch)", "",
             "| variant | batch | img/s | × |", "|---|---:|---:|---:|"]  # fmt: skip
    base = {r["batch"]: r["img_per_s"] for r in rows if r["variant"] == "eager FP32"}
    for r in rows:
        ratio = r["img_per_s"] / base[r["batch"]] if r["batch"] in base else float("nan")
        lines.append(f"| {r['variant']} | {r['batch']} | {r['img_per_s']:.1f} | {ratio:.2f} |")
    lines += ["", "## Pyramid RoIAlign (3 levels, 256 channels, input 512; CUDA events, median µs per call)",
              "",
              "| dtype | N | RoIs/image | pooled | variant | µs | × vs torchvision |",
              "|---|---:|---:|---:|---|---:|---:|"]
    for r in roi:
        lines.append(f"| {r['dtype']} | {r['n']} | {r['rois']} | {r['pooled']} | {r['variant']} | {r['us']:.1f} | "
                     f"{r['speedup_vs_torchvision']:.2f} |")  # fmt: skip
    (a.out / "maskrcnn_h100.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
