"""Training img/s on 1 GPU vs N GPUs (DDP through torchrun), the same run otherwise, side by side.

Each count trains ``python -m train OVERRIDES`` (1 process) or ``torchrun --standalone --nproc_per_node=N -m train
OVERRIDES`` into its own folder; the figures come from the run's own ``last.pt`` history (rank 0's img/s counts all
ranks' images): epoch 1 apart, steady = median of the later epochs; final AP50 from the last epoch's evaluation.
``batch_size`` is the global batch, so the runs see the same samples per step.

    NCCL_NVLS_ENABLE=0 python benchmarks/ddp_throughput.py --gpus 1 2 --out benchmarks/results/ddp_h200x2.md -- \
        model.kwargs.pretrained=null data.root=... batch_size=64 workers=14 epochs=5 loader.cache=ram
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sidnet.checkpoint import load_checkpoint
from sidnet.environment import environment, publish_report

ROOT = Path(__file__).resolve().parents[1]


def run(n: int, overrides: list[str], run_dir: Path, log: Path) -> dict:
    launcher = [sys.executable, "-m", "train"]
    if n > 1:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
        launcher = [*torchrun, *launcher[1:]]
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"=== {n} GPU(s)\n")
        f.flush()
        done = subprocess.run([*launcher, *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT, stdout=f,
                              stderr=subprocess.STDOUT)  # fmt: skip
    wall = time.perf_counter() - t0
    if done.returncode:
        tail = log.read_text().strip().splitlines()[-3:]  # the log ends with this run's output
        raise SystemExit(f"error: the {n}-GPU run failed (exit {done.returncode}): {' | '.join(tail)}")
    hist = load_checkpoint(run_dir / "last.pt")["history"]
    rates = [h["img_per_s"] for h in hist]
    return {"gpus": n, "first": rates[0], "steady": statistics.median(rates[1:] or rates), "wall_s": wall,
            "ap50": hist[-1].get("val_AP50"), "loss": hist[-1]["loss"], "epochs": len(hist)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", nargs="+", type=int, default=[1, 2])
    p.add_argument("--out", type=Path)
    p.add_argument("--logs", type=Path, help="folder for each run's output (default: beside --out)")
    p.add_argument("overrides", nargs="*", help="python -m train overrides (after --)")
    args = p.parse_args()
    logs = args.logs or (args.out.parent if args.out else Path(tempfile.gettempdir()))
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.gpus:
            rows.append(run(n, args.overrides, Path(tmp) / f"gpus{n}", logs / "ddp_runs.log"))
            print(json.dumps(rows[-1]), flush=True)
    env = environment("cuda" if torch.cuda.is_available() else "cpu")
    base = rows[0]
    lines = [f"# Multi-GPU training throughput ({env['date']})", "",
             f"Device: {torch.cuda.device_count()} × {env['device']} | torch {env['torch']} | CUDA {env['cuda']} | "
             f"Python {env['python']}", "", f"Command: `{env['command']}`", "",
             "Overrides: `" + " ".join(args.overrides) + "`", "",
             "| GPUs | training img/s (epoch 1) | training img/s (steady) | speed-up (steady) | wall s (incl. start, "
             "eval) | final loss | final AP50 |", "|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        ap = f"{r['ap50']:.3f}" if isinstance(r["ap50"], float) else "-"
        lines.append(f"| {r['gpus']} | {r['first']:,.0f} | {r['steady']:,.0f} | {r['steady'] / base['steady']:.2f}x | "
                     f"{r['wall_s']:.0f} | {r['loss']:.3f} | {ap} |")  # fmt: skip
    publish_report(lines, out=args.out, payload={"env": env, "rows": rows, "overrides": args.overrides})


if __name__ == "__main__":
    main()
