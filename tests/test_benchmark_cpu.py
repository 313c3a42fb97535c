"""``python -m deploy.benchmark`` on a machine without CUDA: your own artifacts timed on the CPU, side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path: torch would pick CUDA here")
def test_benchmark_times_your_own_checkpoint_and_onnx_on_the_cpu(tiny_checkpoint, tiny_onnx, tmp_path):
    r = subprocess.run([sys.executable, "-m", "deploy.benchmark", "--onnx", str(tiny_onnx), "--checkpoint",
                        str(tiny_checkpoint), "--batches", "1", "2", "--seconds", "0.2", "--out", str(tmp_path),
                        "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    rows = result["rows"]
    assert {(x["backend"], x["mode"], x["batch"]) for x in rows} == {
        (b, m, n) for b in ("onnxruntime", "torch") for m in ("network", "end_to_end") for n in (1, 2)}
    assert all(x["img_s"] > 0 and x["p50_ms"] <= x["p99_ms"] and x["iters"] >= 5 for x in rows)
    assert all(x["vs_first"] == 1.0 for x in rows if x["backend"] == "torch")  # the first artifact (--checkpoint)
    assert result["env"]["device"].startswith("CPU") and result["skipped"] == []
    assert next(x for x in rows if x["backend"] == "onnxruntime")["file_mb"] > 0
    md = (tmp_path / "artifacts.md").read_text()
    assert "| artifact | mode | batch |" in md and "torch" in md and result["env"]["date"] in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_benchmark_without_cuda_refuses_an_engine_and_names_skipped_parts(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    r = subprocess.run([sys.executable, "-m", "deploy.benchmark", "--engine", str(engine)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 1 and r.stderr.startswith("error: --engine") and "--onnx" in r.stderr
    assert r.stderr.count("\n") == 1


def test_loader_benchmark_runs_every_kind_of_row_on_the_cpu(tmp_path):
    """benchmarks/loader_throughput.py (the GPU machine's loader table) on the bundled sample at a tiny size: a cached
    CPU option, the device-resident cache (inline and prefetched by a thread) and the no-loader row, side by side,
    every rate positive."""
    out = tmp_path / "loader.md"
    r = subprocess.run([sys.executable, "benchmarks/loader_throughput.py", "--root", "sidnet/sample", "--images",
                        "images/train2017", "--labels", "labels/boxes/train2017", "--size", "64", "--batch", "4",
                        "--workers", "0", "--steps", "2", "--epochs", "2", "--threads", "2", "--device", "cpu",
                        "--options", "ram", "device", "device_cl_prefetch", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [x["option"] for x in rows] == ["ram", "device", "device_cl_prefetch", "gpu_bound"]
    assert all(x["train_first"] > 0 and x["train_steady"] > 0 for x in rows)
    assert all(x["loader_steady"] > 0 for x in rows[:3])
    assert "| device: gpu_aug + cache=device |" in out.read_text()


def test_maskrcnn_part_runs_its_cpu_rows_and_writes_its_table(tmp_path):
    """``--parts maskrcnn`` on a CPU: torchvision's eager FP32 beside the torch backend's static deploy module, on real
    images, random weights (small input and topk to keep it seconds); a SIDNet checkpoint is refused in one line.
    The GPU rows (FP16, CUDA graphs, torch.compile) run in benchmarks/run_gpu.sh bench-maskrcnn."""
    from sidnet.data.sample import sample_root

    cmd = [sys.executable, "-m", "deploy.benchmark", "--parts", "maskrcnn", "--maskrcnn-size", "96", "--maskrcnn-count",
           "2", "--maskrcnn-iters", "1", "--maskrcnn-topk", "5", "--batches", "1", "2", "--maskrcnn-images",
           str(sample_root() / "images" / "val2017"), "--out", str(tmp_path),
           "--work-dir", str(tmp_path / "w")]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "deploy_maskrcnn.json").read_text())
    assert {(x["variant"], x["batch"]) for x in result["rows"]} == {
        (v, b) for v in ("eager FP32", "torch backend FP32, deploy module, eager") for b in (1, 2)}
    assert all(x["img_s"] > 0 for x in result["rows"]) and result["input_size"] == 96
    assert "| eager FP32 | 1 |" in (tmp_path / "deploy_maskrcnn.md").read_text()
    sidnet = tmp_path / "w" / "sidnet.pt"
    from sidnet.runtime.benchmark import _save_checkpoint, build_random

    _save_checkpoint(build_random("sidnet", input_size=96), "sidnet", sidnet)
    r = subprocess.run(cmd + ["--maskrcnn-checkpoint", str(sidnet)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode != 0 and "holds model 'sidnet', not maskrcnn" in r.stderr.strip().splitlines()[-1]
