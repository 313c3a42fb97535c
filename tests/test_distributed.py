"""Multi-process training through torchrun with 2 CPU processes (gloo) on the bundled sample: one writer, disjoint
shards, exact resume; and the one-line refusals of a wrong launch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sidnet.checkpoint import load_checkpoint
from sidnet.config import ConfigError
from sidnet.engine.distributed import launch_from_env

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=sidnet", "model.anchors=[[12,24],[30,60],[70,110]]", "model.input_size=128", "model.kwargs.width=0.125",
        "data=sample", "batch_size=4", "workers=0", "device=cpu", "tensorboard=false", "eval.every=1",
        "optim.warmup_epochs=1", "epochs=2"]  # fmt: skip
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
       "MASTER_PORT": "29500"}  # fmt: skip


def _torchrun(args: list[str], *, cwd: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1", **extra_env)
    return subprocess.run([*TORCHRUN, "-m", "train", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_two_gloo_processes_one_writer_disjoint_shards_exact_resume(tmp_path):
    full = tmp_path / "full"
    r = _torchrun(["-v", *TINY, f"hydra.run.dir={full}"], cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    # Each epoch: the two ranks' image ids are disjoint and together the whole train split (8 images, 4 per rank).
    for epoch in (1, 2):
        ids = {int(m.group(1)): json.loads(m.group(2))
               for m in re.finditer(rf"rank (\d) epoch {epoch} image ids (\[.*?\])", log)}  # fmt: skip
        assert set(ids) == {0, 1} and len(ids[0]) == len(ids[1]) == 4
        assert not set(ids[0]) & set(ids[1]) and len(set(ids[0]) | set(ids[1])) == 8
    # Rank 0 alone wrote: one checkpoint per epoch, evaluated once per epoch.
    writes = re.findall(r"\[rank (\d)\].*wrote .*last\.pt", log)
    assert writes == ["0", "0"]
    assert len(re.findall(r"\[rank \d\].*epoch 2/2 \{", log)) == 1
    assert (full / "best.pt").is_file() and (full / "train.log").is_file()
    state = load_checkpoint(full / "last.pt")
    assert state["epoch"] == 2 and [h["epoch"] for h in state["history"]] == [1, 2]
    assert "val_AP50" in state["history"][1]

    # Resume: the same run killed (SIGKILL on rank 0) while writing epoch 2's checkpoint keeps epoch 1's last.pt;
    # continued by 2 processes it gives the same weights bit for bit.
    cut = tmp_path / "cut"
    r = _torchrun([*TINY, f"hydra.run.dir={cut}"], cwd=ROOT, SIDNET_FAULT="kill:last.pt:2")
    assert r.returncode != 0 and load_checkpoint(cut / "last.pt")["epoch"] == 1, r.stderr[-3000:]
    r = _torchrun([*TINY, "resume=true", f"hydra.run.dir={cut}"], cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(cut / "last.pt")
    assert b["epoch"] == 2 and all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in a["model_state"])
    assert b["history"][-1]["loss"] == a["history"][-1]["loss"]


def test_wrong_launches_fail_with_one_line():
    cpu = dict(device="cpu", batch_size=4, cuda_devices=0)
    assert launch_from_env({}, **cpu) == (0, 1, 0)
    assert launch_from_env({**ENV, "RANK": "1", "LOCAL_RANK": "1"}, **cpu) == (1, 2, 1)
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2 is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not"):
        launch_from_env({"WORLD_SIZE": "2"}, **cpu)
    with pytest.raises(ConfigError, match=r"batch_size=5 .* multiple of 2"):
        launch_from_env(ENV, **{**cpu, "batch_size": 5})
    with pytest.raises(ConfigError, match=r"--nproc_per_node=2 but this host has 1 visible CUDA"):
        launch_from_env(ENV, device="cuda", batch_size=4, cuda_devices=1)
    with pytest.raises(ConfigError, match=r"device=cuda:1 .* cuda:LOCAL_RANK"):
        launch_from_env(ENV, device="cuda:1", batch_size=4, cuda_devices=2)


def test_world_size_without_torchrun_is_one_error_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    env.update(PYTHONPATH=str(ROOT), WORLD_SIZE="2", NO_ALBUMENTATIONS_UPDATE="1")
    r = subprocess.run([sys.executable, "-m", "train", *TINY, f"hydra.run.dir={tmp_path / 'x'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: WORLD_SIZE=2 is set but RANK")
    assert "Traceback" not in r.stderr and not (tmp_path / "x" / "config.yaml").exists()
