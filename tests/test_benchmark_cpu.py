"""``python -m deploy.benchmark`` on a machine without CUDA: your own artifacts timed on the CPU, side by side."""

from __future__ import annotations

import json
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
