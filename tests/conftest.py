"""Shared fixtures: the ../shared data folder and builders for tiny (possibly broken) datasets."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Disk: the suite trains and exports real models (an 800 MB checkpoint, 100 MB ONNX files); kept, their folders came to
# 8 GB per run, and the CI machine's shared disk filled mid-run once (torch.save: "unexpected pos"). pyproject's
# tmp_path_retention_policy = "failed" removes a passing test's tmp_path as soon as it ends (a failing one's is kept).
_TEMP = pytest.StashKey[tuple]()


def pytest_configure(config: pytest.Config) -> None:
    """Every temporary file of the tests and their child processes goes in one folder, removed at the end.

    Set before collection, so module-level ``ENV = {**os.environ, ...}`` copies carry it to the children. The fault
    campaign kills exports and trainings with SIGKILL mid-write, which leaves their ``TemporaryDirectory`` behind; here
    it goes with the session instead of piling up in /tmp.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:  # pytest -n N: each worker (and every process it starts) gets its share of the cores, set before
        # torch is imported; OpenMP threads of two workers spinning on the same cores ran one training test 4x slower
        share = str(max(1, len(os.sched_getaffinity(0)) // workers))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, share)
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())  # pytest's own tmp_path root stays put
    folder = tempfile.mkdtemp(prefix="sidnet-tests-")
    config.stash[_TEMP] = (folder, os.environ.get("TMPDIR"), tempfile.tempdir)
    os.environ["TMPDIR"] = tempfile.tempdir = folder


def pytest_unconfigure(config: pytest.Config) -> None:
    folder, env, cached = config.stash.get(_TEMP, (None, None, None))
    if folder is None:
        return
    if env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = env
    tempfile.tempdir = cached
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the repository (override with ``SIDNET_SHARED_DATA``); skips when absent."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    path = Path(os.environ.get("SIDNET_SHARED_DATA", default))
    if not (path / "coco128").is_dir():
        pytest.skip(f"shared data not found at {path} (set SIDNET_SHARED_DATA to the folder holding coco128/)")
    return path


def write_image(path: Path, width: int = 64, height: int = 48, seed: int = 0) -> Path:
    """A small random RGB JPEG (random, not constant, so decoding bugs cannot hide behind a flat image)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


@pytest.fixture
def yolo_dataset(tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    """Factory: ``make({"a": "0 0.5 0.5 0.2 0.2", ...})`` -> (images dir, labels dir) with 64x48 images.

    A ``None`` label means the image has no label file.
    """

    def make(labels: dict[str, str | None], *, width: int = 64, height: int = 48) -> tuple[Path, Path]:
        images_dir, labels_dir = tmp_path / "images", tmp_path / "labels"
        labels_dir.mkdir(parents=True, exist_ok=True)
        for i, (stem, text) in enumerate(labels.items()):
            write_image(images_dir / f"{stem}.jpg", width, height, seed=i)
            if text is not None:
                (labels_dir / f"{stem}.txt").write_text(text + "\n")
        return images_dir, labels_dir

    return make


@pytest.fixture
def coco_dataset(tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    """Factory: ``make(annotations=[...], n_images=2)`` -> (instances json, images dir) with 64x48 images.

    Categories: 1 = person, 2 = bicycle. Images are ``img0.jpg``... with ids 1, 2, ...
    """

    def make(annotations: list[dict], *, n_images: int = 2, create_images: bool = True) -> tuple[Path, Path]:
        images_dir = tmp_path / "images"
        images_dir.mkdir(exist_ok=True)
        images = []
        for i in range(n_images):
            if create_images:
                write_image(images_dir / f"img{i}.jpg", seed=i)
            images.append({"id": i + 1, "file_name": f"img{i}.jpg", "width": 64, "height": 48, "license": 1})
        anns = [{"id": k + 1, "iscrowd": 0, "category_id": 1, "image_id": 1, **a} for k, a in enumerate(annotations)]
        data = {
            "images": images,
            "annotations": anns,
            "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}],
        }
        json_path = tmp_path / "instances.json"
        json_path.write_text(json.dumps(data))
        return json_path, images_dir

    return make


TINY_ANCHORS = [[12.0, 24.0], [30.0, 60.0], [70.0, 110.0]]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny 1-class SIDNet checkpoint (width 0.125, 128², BatchNorm calibrated on random images): fast on a CPU,
    varied untrained outputs. Saved the way ``python -m train`` saves (``save_checkpoint``)."""
    import torch

    from sidnet.checkpoint import save_checkpoint
    from sidnet.export.adapters import calibrate_batchnorm
    from sidnet.models import build_model

    torch.manual_seed(0)
    model = calibrate_batchnorm(build_model("sidnet", anchors=TINY_ANCHORS, num_classes=1, input_size=128, width=0.125))
    spec = {"name": "sidnet", "anchors": TINY_ANCHORS, "num_classes": 1, "input_size": 128, "kwargs": {"width": 0.125}}
    path = tmp_path_factory.mktemp("tiny") / "best.pt"
    save_checkpoint({"model": spec, "model_state": model.state_dict(), "ema": None, "epoch": 0,
                     "config": {"data": {"class_names": ["person"]}}}, path)  # fmt: skip
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint, tmp_path_factory) -> Path:
    """``python -m export``'s ONNX (native target, fp32, conf_thresh 0.001) of :func:`tiny_checkpoint`."""
    from sidnet.export.config import ExportConfig
    from sidnet.export.pipeline import run_export

    out = tmp_path_factory.mktemp("tiny_export")
    cfg = ExportConfig(checkpoint=str(tiny_checkpoint), out=str(out))
    return run_export(cfg, project_root=Path(__file__).resolve().parents[1]).onnx_path


def video_frames(shared: Path, n: int) -> list:
    """The first ``n`` frames of the shared pedestrian clip, RGB uint8."""
    import cv2

    cap = cv2.VideoCapture(str(shared / "video" / "pedestrians_200.mp4"))
    frames = []
    for _ in range(n):
        ok, bgr = cap.read()
        assert ok, "pedestrians_200.mp4 ended early"
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames


@pytest.fixture(scope="session")
def golden(tmp_path_factory):
    """One tiny trained run per registered model, made on first use and shared by the golden-path matrix and the
    README test (:class:`tests.golden.GoldenRuns`)."""
    from tests.golden import GoldenRuns

    if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one folder for all workers (pytest-N/, beside popen-gwK/)
        base = tmp_path_factory.getbasetemp().parent / "golden"
        base.mkdir(exist_ok=True)
        return GoldenRuns(base)
    return GoldenRuns(tmp_path_factory.mktemp("golden"))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An xdist worker hands its ``python -m`` timings to the controller (``workeroutput``)."""
    from tests.golden import TIMINGS

    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["sidnet_timings"] = json.dumps(TIMINGS)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """The controller gathers the workers' timings (pytest-xdist's hook; unused without ``-n``)."""
    from tests.golden import TIMINGS

    TIMINGS.extend(tuple(t) for t in json.loads(getattr(node, "workeroutput", {}).get("sidnet_timings", "[]")))


def pytest_terminal_summary(terminalreporter):
    """Wall and CPU seconds of the ``python -m`` processes the golden-path and README tests ran (the CPU total is what
    a quiet 2-core CI machine needs; wall time on a shared machine says little). Under ``-n N`` the workers' wall
    times overlap, so their sum exceeds the suite's wall time."""
    from tests.golden import TIMINGS

    if TIMINGS:
        wall, cpu = sum(t[1] for t in TIMINGS), sum(t[2] for t in TIMINGS)
        terminalreporter.write_line(f"python -m processes: {len(TIMINGS)}, wall {wall:.0f} s, CPU {cpu:.0f} s")
