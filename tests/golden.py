"""Shared machinery of the golden-path matrix (``test_golden_paths.py``) and the README test (``test_readme.py``):
real ``python -m ...`` processes from the repository root, and one tiny trained run per registered model, made once
per test session and reused by every later command.

Tiny settings: the bundled sample (8 train + 4 val images; ``sample_seg`` adds person polygons for Mask R-CNN),
one epoch with an evaluation, 64² input (Mask R-CNN 128²), batch 4, no workers, no TensorBoard.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("sidnet", "sidnet_mobilenetv2", "yolov2", "maskrcnn")
SIZE = {"sidnet": 64, "sidnet_mobilenetv2": 64, "yolov2": 64, "maskrcnn": 128}
DATA = {"maskrcnn": "sample_seg"}  # data group per model (default: sample)
AUG = {"maskrcnn": "seg"}
# Narrow versions of the two Darknet-19 models (1/8 of the channels: 0.8M instead of 50M parameters). Every command
# takes the same code path at any width; at full width the ONNX, INT8 (modelopt serialises the graph ~2,000 times),
# QAT and TensorRT-RTX cells spent most of their minutes moving 200 MB of weights around.
NARROW = {"sidnet": ("model.kwargs.width=0.125",), "yolov2": ("model.kwargs.width=0.125",)}
TIMEOUT_S = 600
TIMINGS: list[tuple[str, float, float]] = []  # (command, wall s, CPU s of the process): conftest prints the totals


def video_source() -> Path:
    """The shared pedestrians clip, or the bundled sample's val images (a folder source) when ../shared is absent."""
    clip = ROOT.parent / "shared" / "data" / "video" / "pedestrians_200.mp4"
    return clip if clip.is_file() else ROOT / "sidnet" / "sample" / "images" / "val2017"


def run_cli(*args: str, ok: bool = True, timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess:
    """``python -m <args>`` from the repository root; ``ok``: assert exit status 0 (else assert it failed)."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1", "OPENCV_FFMPEG_LOGLEVEL": "-8"}
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    label = " ".join([*args[:1], *(a for a in args[1:3] if not a.startswith("/"))])
    TIMINGS.append((label, time.perf_counter() - start, cpu))
    if ok:
        assert r.returncode == 0, f"python -m {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}"
    else:
        assert r.returncode != 0, f"python -m {' '.join(args)} should have failed:\n{r.stdout[-2000:]}"
    return r


def last_override_wins(args: list[str]) -> list[str]:
    """Drop earlier ``key=value`` overrides of a key given again later (Hydra refuses a key given twice)."""
    keys = [a.split("=", 1)[0] if re.match(r"^[\w.+~/-]+=", a) and not a.startswith("-") else None for a in args]
    return [a for i, (a, k) in enumerate(zip(args, keys, strict=True)) if k is None or k not in keys[i + 1 :]]


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The failure's stderr must end in exactly one ``error: ...`` line and hold no traceback; returns that line."""
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), f"no one-line error, stderr:\n{r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert sum(ln.startswith("error: ") for ln in lines) == 1, r.stderr[-2000:]
    return lines[-1]


def train_args(model: str, run_dir: Path, *extra: str) -> list[str]:
    """The tiny training command for ``model`` into ``run_dir`` (extra Hydra overrides last: they win)."""
    args = ["train", f"model={model}", f"data={DATA.get(model, 'sample')}", f"aug={AUG.get(model, 'default')}",
            f"model.input_size={SIZE[model]}", "batch_size=4", "workers=0", "tensorboard=false", "epochs=1",
            "eval.every=1", *NARROW.get(model, ()), f"name={run_dir.name}", f"hydra.run.dir={run_dir}",
            *extra]  # fmt: skip
    return last_override_wins(args)


def read_checkpoint(path: Path) -> dict:
    """A checkpoint as data (``weights_only=True``, as every loader in the project)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def finite_metrics(report: dict, keys: tuple[str, ...]) -> None:
    for k in keys:
        v = report.get(k)
        assert isinstance(v, (int, float)) and math.isfinite(v), f"{k} = {v!r} in {sorted(report)}"


def read_json(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


@dataclass
class GoldenRuns:
    """One trained run per model, made on first use (``trained``) and then shared by every test of the session.

    ``base`` may be shared by several pytest-xdist workers: each artefact is made under a file lock by the first worker
    that needs it and marked done; the others wait for the lock and reuse it. A failed make leaves no mark, so the next
    worker that needs it tries again from an empty folder (and fails the same way, with its own message).
    """

    base: Path

    def _once(self, key: str, make) -> Path:
        out = self.base / key
        with FileLock(str(self.base / f"{key}.lock")):
            if not (self.base / f"{key}.done").is_file():
                shutil.rmtree(out, ignore_errors=True)
                make(out)
                (self.base / f"{key}.done").touch()
        return out

    def trained(self, model: str) -> Path:
        """The run folder of a 1-epoch training of ``model`` with an in-training evaluation (``last.pt``, ``best.pt``,
        ``config.yaml``); its training log (stderr) is kept as ``train.stderr``."""

        def make(run_dir: Path) -> None:
            r = run_cli(*train_args(model, run_dir))
            (run_dir / "train.stderr").write_text(r.stderr)

        return self._once(model, make)

    def exported(self, model: str, kind: str, *flags: str) -> Path:
        """``python -m export`` of the trained run's ``last.pt`` with ``flags``, once per (model, kind); returns the
        output folder."""
        checkpoint = self.trained(model) / "last.pt"
        return self._once(f"{model}_export_{kind}",
                          lambda out: run_cli("export", "--checkpoint", str(checkpoint), "--out", str(out), *flags))

    def qat(self, model: str) -> Path:
        """The run folder of a one-step QAT fine-tuning of the trained run (``quant=qat``, one calibration batch)."""
        checkpoint = self.trained(model) / "last.pt"
        return self._once(f"{model}_qat", lambda run_dir: run_cli(*qat_args(model, checkpoint, run_dir)))


def qat_args(model: str, init_from: Path, run_dir: Path) -> list[str]:
    return train_args(model, run_dir, "quant=qat", f"quant.init_from={init_from}", "quant.calib_batches=1",
                      "quant.calib_batch_size=4", "max_steps_per_epoch=1")  # fmt: skip
