"""Training throughput (img/s) of the YOLOv2-family models, AMP off vs on, side by side in one run.

One training step = forward, YOLOv2 loss, backward, optimizer step, on random images and random person boxes
(data loading excluded: this measures the model, the loader is measured by the real run's img/s).
Timed with CUDA events after warm-up; median of ``--iters`` steps.

    python benchmarks/train_throughput.py --out benchmarks/results/train_throughput_h100.md
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from sidnet.environment import environment, publish_report
from sidnet.models import build_model
from sidnet.models.loss import RegionLoss

ANCHORS = [[30.0, 60.0], [80.0, 170.0], [200.0, 330.0]]
MODELS = {"sidnet": dict(anchors=ANCHORS), "sidnet_mobilenetv2": dict(anchors=ANCHORS, pretrained=None),
          "yolov2": dict(num_classes=1)}  # fmt: skip


def random_targets(n: int, size: int, gen: torch.Generator) -> list[dict]:
    out = []
    for _ in range(n):
        k = int(torch.randint(0, 6, (1,), generator=gen))
        xy = torch.rand(k, 2, generator=gen) * size * 0.7
        wh = torch.rand(k, 2, generator=gen) * size * 0.3 + 8
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.zeros(k, dtype=torch.long)})
    return out


def bench(name: str, *, batch: int, size: int, amp: bool, iters: int, warmup: int, device: torch.device) -> float:
    model = build_model(name, input_size=size, **MODELS[name]).to(device).train()
    model = model.to(memory_format=torch.channels_last)
    crit = RegionLoss(model.anchors, num_classes=model.num_classes, input_size=size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=gen).to(device).to(memory_format=torch.channels_last)
    targets = [{k: v.to(device) for k, v in t.items()} for t in random_targets(batch, size, gen)]
    times = []
    for i in range(warmup + iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            raw = model(images)
        loss, _ = crit(raw.float(), targets)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1000)
    return batch / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[16, 64])
    p.add_argument("--size", type=int, default=416)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU (run it through benchmarks/run_gpu.sh there)")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    rows = []
    for name in args.models:
        for batch in args.batches:
            fp32 = bench(name, batch=batch, size=args.size, amp=False, iters=args.iters, warmup=args.warmup,
                         device=device)  # fmt: skip
            amp = bench(name, batch=batch, size=args.size, amp=True, iters=args.iters, warmup=args.warmup,
                        device=device)  # fmt: skip
            rows.append({"model": name, "batch": batch, "fp32_img_s": fp32, "amp_img_s": amp,
                         "amp_speedup": amp / fp32})  # fmt: skip
    env = environment(device)
    lines = [f"# Training throughput ({env['date']})", "",
             f"Device: {env['device']} | torch {env['torch']} | CUDA {env['cuda']} | input {args.size}² | "
             f"median of {args.iters} steps after {args.warmup} warm-up | cudnn.benchmark, channels_last, "
             "FP32 = default (TF32 convs allowed by cuDNN)", "",
             "| model | batch | FP32 img/s | AMP fp16 img/s | AMP / FP32 |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['fp32_img_s']:.0f} | {r['amp_img_s']:.0f} | "
                     f"{r['amp_speedup']:.2f}x |")  # fmt: skip
    publish_report(lines, out=args.out, payload={"env": env, "rows": rows})


if __name__ == "__main__":
    main()
