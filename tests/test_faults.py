"""The fault campaign: every way a user's input or the machine can go wrong, with the behaviour it must get.

Table-driven, in the spirit of SQLite's fault-injection tests: each row is (fault, what is run, expected one-line
error or behaviour). Data rows run the readers in-process (strict: one-line ``DataError`` naming the file; with
``data.lenient=true``: counted under a reason and skipped, the good images kept). Config and artifact rows run the
real entry points' ``main(argv)``. The crash rows run real ``python -m train`` subprocesses, SIGKILL them at random
points (several seeds) or inside the checkpoint write, resume, and compare the final weights bit for bit with an
uninterrupted run.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sidnet.checkpoint import VERSION, load_checkpoint, previous_generation
from sidnet.data import DetectionDataset, load_split
from sidnet.data import errors as E
from sidnet.data.errors import DataError
from tests.conftest import write_image

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------------
# Data: images and labels. Each builder makes a YOLO split with two good images plus one fault; returns the bad path.
# ---------------------------------------------------------------------------------------------------------------------
GOOD = "0 0.5 0.5 0.25 0.25"


def _split(tmp: Path, name: str = "bad.jpg", label: str | None = GOOD) -> tuple[Path, Path, Path]:
    images, labels = tmp / "images", tmp / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        write_image(images / f"good{i}.jpg", seed=i)
        (labels / f"good{i}.txt").write_text(GOOD + "\n")
    bad = images / name
    if label is not None:
        (labels / f"{Path(name).stem}.txt").write_text(label + "\n")
    return images, labels, bad


def truncated_jpeg(tmp):
    images, labels, bad = _split(tmp)
    data = write_image(bad, 64, 48, seed=7).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return bad


def text_as_jpeg(tmp):
    _, _, bad = _split(tmp)
    bad.write_text("this is not an image\n")
    return bad


def zero_byte_image(tmp):
    _, _, bad = _split(tmp)
    bad.write_bytes(b"")
    return bad


def huge_image(tmp):
    _, _, bad = _split(tmp)
    # 10000 x 10000 = 100 MP: refused from the header alone (the check never decodes the pixels: bounded memory).
    Image.new("RGB", (10000, 10000), (90, 120, 150)).save(bad, quality=50)
    return bad


def _label_fault(text: str):
    def build(tmp):
        _, _, bad = _split(tmp, label=text)
        write_image(bad, 64, 48, seed=5)
        return bad.with_suffix(".txt")

    return build


DATA_FAULTS = [
    # fault, builder, strict error (regex), lenient reason
    ("truncated JPEG", truncated_jpeg, r"corrupt or unreadable image: .*bad\.jpg.*truncated", E.CORRUPT_IMAGE),
    ("text file named .jpg", text_as_jpeg, r"corrupt or unreadable image: .*bad\.jpg", E.CORRUPT_IMAGE),
    ("zero-byte image", zero_byte_image, r"corrupt or unreadable image: .*bad\.jpg", E.CORRUPT_IMAGE),
    ("10000x10000 image", huge_image, r"bad\.jpg is 10000x10000 \(100 MP\), over the 64 MP", E.TOO_LARGE),
    ("label NaN", _label_fault("0 nan 0.5 0.2 0.2"), r"non-finite box .* in .*bad", E.MALFORMED_LABEL),
    ("label inf", _label_fault("0 0.5 inf 0.2 0.2"), r"non-finite box .* in .*bad", E.MALFORMED_LABEL),
    ("negative width", _label_fault("0 0.5 0.5 -0.2 0.2"), r"zero-area or negative box", E.EMPTY_BOX),
    ("box outside image", _label_fault("0 1.4 0.5 0.3 0.2"), r"lies outside the 64x48 image", E.BOX_OUTSIDE_IMAGE),
    ("wrong column count", _label_fault("0 0.5 0.5 0.2"), r"malformed label line .*expected", E.MALFORMED_LABEL),
    ("unknown class", _label_fault("93 0.5 0.5 0.2 0.2"), r"unknown class id 93", E.UNKNOWN_CLASS),
    ("non-numeric label", _label_fault("person 0.5 0.5 0.2 0.2"), r"malformed label line", E.MALFORMED_LABEL),
]


@pytest.mark.parametrize("fault,build,message,reason", DATA_FAULTS, ids=[r[0] for r in DATA_FAULTS])
def test_data_fault_strict_one_line_and_lenient_counts(tmp_path, fault, build, message, reason):
    bad = build(tmp_path)
    split = dict(format="yolo", root=tmp_path, images="images", labels="labels")
    with pytest.raises(DataError) as err:
        load_split(**split)
    msg = str(err.value)
    assert "\n" not in msg and bad.name in msg and "lenient" in msg, msg
    assert __import__("re").search(message, msg), msg
    records, report = load_split(**split, lenient=True)
    assert report.counts == {reason: 1}, report
    assert {r.path.name for r in records} >= {"good0.jpg", "good1.jpg"}


def test_missing_image_listed_in_coco(coco_dataset):
    json_path, images = coco_dataset([{"bbox": [5, 5, 20, 20]}], n_images=3)
    (images / "img2.jpg").unlink()
    split = dict(format="coco", root=json_path.parent, images="images", annotations=json_path.name)
    with pytest.raises(DataError, match=r"image not found: .*img2\.jpg \(listed in .*instances\.json\)"):
        load_split(**split)
    records, report = load_split(**split, lenient=True)
    assert report.counts == {E.MISSING_IMAGE: 1} and len(records) == 2


def _coco_json(coco_dataset, mutate: Callable[[dict], None]) -> dict:
    json_path, _ = coco_dataset([{"bbox": [5, 5, 20, 20]}], n_images=2)
    data = json.loads(json_path.read_text())
    mutate(data)
    json_path.write_text(json.dumps(data))
    return dict(format="coco", root=json_path.parent, images="images", annotations=json_path.name)


def test_coco_json_that_is_not_json(coco_dataset):
    json_path, _ = coco_dataset([{"bbox": [5, 5, 20, 20]}])
    json_path.write_text('{"images": [')
    with pytest.raises(DataError, match=r"invalid COCO JSON .*instances\.json.*re-export"):
        load_split(format="coco", root=json_path.parent, images="images", annotations=json_path.name, lenient=True)


def test_coco_duplicate_image_ids(coco_dataset):
    split = _coco_json(coco_dataset, lambda d: d["images"][1].update(id=1))
    with pytest.raises(DataError, match=r"duplicate image id 1 in .*\(img0\.jpg and img1\.jpg\)"):
        load_split(**split)
    records, report = load_split(**split, lenient=True)
    assert report.counts == {E.DUPLICATE_ID: 1} and [r.path.name for r in records] == ["img0.jpg"]


def test_coco_annotation_pointing_at_missing_image_id(coco_dataset):
    split = _coco_json(coco_dataset, lambda d: d["annotations"][0].update(image_id=77))
    with pytest.raises(DataError, match=r"annotation refers to an unknown image id .*annotation id 1"):
        load_split(**split)
    records, report = load_split(**split, lenient=True)
    assert report.counts == {E.MALFORMED_LABEL: 1} and len(records) == 2


# Inputs that are unusual but valid: they must load, decode to RGB uint8 the way the labels see them, and letterbox.
def _accept(tmp: Path, name: str, write: Callable[[Path], None], label: str = GOOD) -> tuple[list, Path]:
    images, labels, bad = _split(tmp, name=name, label=label)
    write(bad)
    records, report = load_split(format="yolo", root=tmp, images="images", labels="labels")
    assert report.total == 0
    return records, bad


def _decoded(records, path: Path) -> np.ndarray:
    from sidnet.data.dataset import load_rgb

    record = next(r for r in records if r.path == path)
    image = load_rgb(record)
    ds = DetectionDataset(records, size=64)
    tensor, target = ds[records.index(record)]
    assert tensor.shape == (3, 64, 64) and 0 <= tensor.min() and tensor.max() <= 1
    assert image.dtype == np.uint8 and image.shape == (record.height, record.width, 3)
    return image


def test_one_pixel_image_loads_and_letterboxes(tmp_path):
    records, bad = _accept(tmp_path, "one.png", lambda p: Image.new("RGB", (1, 1), (200, 10, 30)).save(p), label="")
    assert tuple(_decoded(records, bad)[0, 0]) == (200, 10, 30)


def test_grayscale_png_becomes_three_equal_channels(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (48, 64), dtype=np.uint8)
    records, bad = _accept(tmp_path, "gray.png", lambda p: Image.fromarray(gray, mode="L").save(p))
    image = _decoded(records, bad)
    assert all(np.array_equal(image[..., c], gray) for c in range(3))


def test_cmyk_jpeg_decodes_to_the_same_rgb_as_pil(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    records, bad = _accept(tmp_path, "cmyk.jpg", lambda p: Image.fromarray(rgb).convert("CMYK").save(p, quality=95))
    with Image.open(bad) as im:
        assert im.mode == "CMYK"
        ref = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert np.abs(_decoded(records, bad).astype(np.int16) - ref).mean() < 2.0  # libjpeg vs PIL rounding


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    import cv2

    deep = np.random.default_rng(2).integers(0, 65536, (48, 64, 3), dtype=np.uint16)
    records, bad = _accept(tmp_path, "deep.png", lambda p: cv2.imwrite(str(p), deep))
    assert np.array_equal(_decoded(records, bad)[..., ::-1], (deep >> 8).astype(np.uint8))


def test_exif_rotated_jpeg_keeps_the_stored_pixel_grid(tmp_path):
    """Decision (README, 'EXIF orientation'): labels refer to the stored pixels, as COCO and YOLO exports do; the
    EXIF Orientation tag is ignored everywhere (reader sizes, decoding, evaluation), so boxes stay on their people."""
    pixels = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)

    def write(p: Path) -> None:
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW to display": a viewer shows it 48 wide, 64 high
        Image.fromarray(pixels).save(p, quality=95, exif=exif)

    records, bad = _accept(tmp_path, "rotated.jpg", write, label="0 0.25 0.5 0.2 0.5")
    record = next(r for r in records if r.path == bad)
    assert (record.width, record.height) == (64, 48)
    np.testing.assert_allclose(record.boxes[0], [9.6, 12.0, 22.4, 36.0], atol=1e-4)  # on the stored grid
    with Image.open(bad) as im:  # PIL leaves the orientation alone unless asked (ImageOps.exif_transpose)
        stored = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert np.abs(_decoded(records, bad).astype(np.int16) - stored).mean() < 2.0  # the stored grid, not rotated


def test_paths_with_spaces_and_non_ascii_letters(tmp_path):
    folder = tmp_path / "caméra 1 — Zürich"
    records, bad = _accept(folder, "personne été.jpg", lambda p: write_image(p, 64, 48, seed=9))
    assert _decoded(records, bad).shape == (48, 64, 3)


def test_empty_label_file_is_a_negative_image(tmp_path):
    records, bad = _accept(tmp_path, "empty.jpg", lambda p: write_image(p, 64, 48, seed=4), label="")
    assert next(r for r in records if r.path == bad).is_negative


# ---------------------------------------------------------------------------------------------------------------------
# Config: the real `python -m train` entry point, in-process; each must fail before anything is written.
# ---------------------------------------------------------------------------------------------------------------------
TINY = ["model=sidnet", "model.anchors=[[12,24],[30,60],[70,110]]", "model.input_size=128", "model.kwargs.width=0.125",
        "data=sample", "batch_size=2", "workers=0", "device=cpu", "tensorboard=false", "eval.every=100",
        "optim.warmup_epochs=1", "aug=none"]  # fmt: skip


def _five_anchors(tmp: Path) -> str:
    path = tmp / "five.yaml"
    path.write_text("anchors: [[10, 20], [20, 40], [40, 80], [80, 160], [160, 320]]\n")
    return f"model.anchors={path}"


CONFIG_FAULTS = [
    ("typo'd key", ["epochz=3"], r"bad configuration: Could not override 'epochz'.*To append"),
    ("wrong type", ["epochs=many"], r"bad configuration: .*epochs=many.*Value 'many'"),
    ("batch_size=0", ["batch_size=0"], r"batch_size=0 is invalid: use a positive batch size"),
    ("negative batch_size", ["batch_size=-4"], r"batch_size=-4 is invalid"),
    ("negative lr", ["optim.lr=-0.01"], r"optim\.lr=-0\.01 is invalid: use a positive learning rate"),
    ("input size not a multiple of 32", ["model.input_size=100"], r"input size 100 \(model\.input_size\) must be"),
    ("anchors YAML with 5 anchors for SIDNet", _five_anchors, r"has 5 anchors but this model is defined with 3"),
    ("unknown device", ["device=gpu0"], r"device='gpu0' is not a device"),
    ("unknown flag", ["--epochs", "3"], r"unknown flag\(s\) --epochs"),
]


def _run_main(main: Callable, argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    code = exit_.value.code
    err = capsys.readouterr().err
    if isinstance(code, str):  # SystemExit("error: ...") prints the message and exits 1
        err, code = err + code, 1
    return code, err


def _one_error_line(code: int, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


@pytest.mark.parametrize("fault,overrides,message", CONFIG_FAULTS, ids=[r[0] for r in CONFIG_FAULTS])
def test_config_fault_one_line(tmp_path, capsys, fault, overrides, message):
    from train.__main__ import main

    extra = [overrides(tmp_path)] if callable(overrides) else overrides
    run_dir = tmp_path / "run"
    line = _one_error_line(*_run_main(main, [*TINY, "epochs=1", f"hydra.run.dir={run_dir}", *extra], capsys))
    assert __import__("re").search(message, line), line
    assert not (run_dir / "last.pt").exists() and not (run_dir / "config.yaml").exists()


ANCHOR_FAULTS = [
    ("data YAML missing", ["--data", "nope.yaml"], r"data YAML not found: nope\.yaml"),
    ("k=0", ["--data", "conf/data/sample.yaml", "-k", "0"], r"k must be >= 1, got 0"),
    (
        "more anchors than boxes",
        ["--data", "conf/data/sample.yaml", "-k", "50", "--evolve", "0"],
        r"k=50 anchors requested but only 17 boxes",
    ),
    ("size not a number", ["--data", "conf/data/sample.yaml", "--size", "x"], r"argument --size: invalid int"),
]


@pytest.mark.parametrize("fault,argv,message", ANCHOR_FAULTS, ids=[r[0] for r in ANCHOR_FAULTS])
def test_anchor_tuner_fault_one_line(capsys, monkeypatch, fault, argv, message):
    from train.anchors import main

    monkeypatch.chdir(ROOT)
    line = _one_error_line(*_run_main(main, argv, capsys))
    assert __import__("re").search(message, line), line


# ---------------------------------------------------------------------------------------------------------------------
# Crashes: real training subprocesses killed with SIGKILL, then resumed; final weights compared bit for bit.
# ---------------------------------------------------------------------------------------------------------------------
CRASH_RUN = [*TINY, "epochs=3", "batch_size=1"]  # 8 steps an epoch: room for a kill to land inside one
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(run_dir: Path, *extra: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *CRASH_RUN, f"hydra.run.dir={run_dir}", *extra], cwd=ROOT,
                          env=env or ENV, capture_output=True, text=True, timeout=300, **kw)  # fmt: skip


def _finish(run_dir: Path) -> subprocess.CompletedProcess:
    """After a crash: resume from the last complete epoch, or start again when none completed."""
    resume = ["resume=true"] if (run_dir / "last.pt").exists() else []
    done = _train(run_dir, *resume)
    assert done.returncode == 0, done.stderr[-1500:]
    return done


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run_dir / "last.pt")
    assert state["epoch"] == 3 and state["version"] == VERSION
    flat = {f"model.{k}": v for k, v in state["model_state"].items()}
    flat.update({f"ema.{k}": v for k, v in state["ema"].items()})
    for i, s in state["optimizer"]["state"].items():
        flat.update({f"opt.{i}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)})
    return flat


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ from the uninterrupted run, e.g. {diff[:3]}"


def _stamp(line: str) -> float:
    from datetime import datetime

    return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, float]:
    """An uninterrupted run: final weights, and how long one epoch takes (to aim the random kills)."""
    run_dir = tmp_path_factory.mktemp("reference")
    done = _train(run_dir)
    assert done.returncode == 0, done.stderr[-1500:]
    lines = done.stderr.splitlines()
    start = next(_stamp(ln) for ln in lines if "][sidnet.data][INFO] - train: {" in ln)
    first = next(_stamp(ln) for ln in lines if "- epoch 1/3 " in ln)
    return _weights(run_dir), first - start


# (seed, epoch to kill in): a random instant inside that epoch; before the first checkpoint exists, inside the
# second and inside the last (after which resume must still evaluate and write best.pt).
KILL_POINTS = [(0, 1), (1, 1), (2, 2), (3, 2), (4, 3)]


@pytest.mark.parametrize("seed,epoch", KILL_POINTS, ids=[f"seed{s}-epoch{e}" for s, e in KILL_POINTS])
def test_sigkill_at_a_random_point_then_resume_is_bit_identical(tmp_path, reference, seed, epoch):
    """SIGKILL at a random instant of epoch `epoch`: resume=true continues from the last complete epoch (or the run
    starts again when none completed) and ends with the same weights, EMA and optimizer state as the run never
    killed."""
    ref, epoch_seconds = reference
    marker = "][sidnet.data][INFO] - train: {" if epoch == 1 else f"- epoch {epoch - 1}/3 "
    proc = subprocess.Popen([sys.executable, "-m", "train", *CRASH_RUN, f"hydra.run.dir={tmp_path}"], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    for line in proc.stderr:
        if marker in line:
            break
    # The kill lands at the random instant or as epoch `epoch` ends, whichever comes first: the reference's epoch time
    # only aims it, and a machine that got faster since (another test process finished) cannot carry the run past
    # the epoch under test.
    ended = threading.Event()

    def watch() -> None:  # reads to EOF (the kill closes the pipe), so the child never blocks on a full pipe
        for ln in proc.stderr:
            if f"- epoch {epoch}/3 " in ln:
                ended.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    ended.wait(random.Random(seed).uniform(0.0, 0.9) * epoch_seconds)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    watcher.join(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill: make the epoch longer"
    last = tmp_path / "last.pt"
    completed = load_checkpoint(last)["epoch"] if last.exists() else 0
    assert epoch - 2 <= completed <= epoch  # inside epoch `epoch`, or in the checkpoint write just before it
    _finish(tmp_path)
    _assert_same(ref, _weights(tmp_path))


@pytest.mark.parametrize("write", [1, 2])
def test_sigkill_inside_the_checkpoint_write(tmp_path, reference, write):
    """Killed halfway through writing last.pt (after epoch `write`): the file on disk is still the previous complete
    one (or absent), the half-written temporary is removed on restart, and the result is bit-identical."""
    killed = _train(tmp_path, env={**ENV, "SIDNET_FAULT": f"kill:last.pt:{write}"})
    assert killed.returncode == -signal.SIGKILL
    assert list(tmp_path.glob(".last.pt.*.tmp")), "the fault should leave a half-written temporary"
    if write == 1:
        assert not (tmp_path / "last.pt").exists()
    else:
        assert load_checkpoint(tmp_path / "last.pt")["epoch"] == write - 1
    done = _finish(tmp_path)
    assert "left by a writer that was killed mid-write" in done.stderr
    assert not list(tmp_path.glob(".*.tmp"))
    _assert_same(reference[0], _weights(tmp_path))


def test_disk_full_during_checkpoint_write_keeps_the_old_checkpoint(tmp_path, reference):
    """ENOSPC in the middle of writing last.pt (as a full disk raises it): one line, the epoch-1 checkpoint intact,
    no temporary left; after freeing space, resume=true ends bit-identical."""
    full = _train(tmp_path, env={**ENV, "SIDNET_FAULT": "enospc:last.pt:2"})
    line = _one_error_line(full.returncode, full.stderr)
    assert "No space left on device" in line and "last.pt from the last complete epoch is intact" in line, line
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1 and not list(tmp_path.glob(".*.tmp"))
    _finish(tmp_path)
    _assert_same(reference[0], _weights(tmp_path))


@pytest.mark.parametrize("damage", ["truncated", "zero-byte"])
def test_damaged_last_checkpoint_is_refused_and_the_previous_generation_kept(tmp_path, reference, damage):
    """One generation on disk after a clean run (last.prev.pt exists only while a write is in flight); a damaged
    last.pt is refused with one line, which names last.prev.pt and the cp that continues from it when a writer
    killed after its rename left one (simulated here by putting a complete copy there)."""
    done = _train(tmp_path)
    assert done.returncode == 0
    last, prev = tmp_path / "last.pt", previous_generation(tmp_path / "last.pt")
    assert not prev.exists() and not (tmp_path / "best.prev.pt").exists()  # one generation kept on disk
    data = last.read_bytes()
    shutil.copyfile(last, tmp_path / "complete.pt")  # a copy: damaging last.pt in place would damage a hard link
    last.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"")
    again = _train(tmp_path, "resume=true", "epochs=4")
    line = _one_error_line(again.returncode, again.stderr)
    assert str(last) in line and "previous generation" not in line, line
    os.replace(tmp_path / "complete.pt", prev)
    again = _train(tmp_path, "resume=true", "epochs=4")
    line = _one_error_line(again.returncode, again.stderr)
    assert str(last) in line and f"previous generation {prev} is intact" in line and f"cp {prev} {last}" in line
    assert load_checkpoint(prev)["epoch"] == 3
    assert last.stat().st_size == (0 if damage == "zero-byte" else len(data) // 3)


def test_restart_without_resume_refuses_and_keeps_the_run_config(tmp_path, capsys):
    """Starting again into a finished run folder without resume=true: one line, and the run's config.yaml and
    .hydra/ are not overwritten by the refused command's settings."""
    from train.__main__ import main

    run_dir = tmp_path / "run"
    main([*TINY, "epochs=1", "max_steps_per_epoch=1", f"hydra.run.dir={run_dir}"])
    kept = [run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml", run_dir / ".hydra" / "overrides.yaml"]
    before = [p.read_bytes() for p in kept]
    argv = [*TINY, "epochs=1", "optim.lr=0.5", f"hydra.run.dir={run_dir}"]
    line = _one_error_line(*_run_main(main, argv, capsys))
    assert "last.pt exists: pass resume=true" in line, line
    assert [p.read_bytes() for p in kept] == before


def test_second_training_into_the_same_run_folder_refuses(tmp_path):
    argv = [sys.executable, "-m", "train", *TINY, "epochs=200", f"hydra.run.dir={tmp_path}"]
    first = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "config.yaml").exists():  # written only once the lock is held
            assert first.poll() is None and time.monotonic() < deadline, "first training did not start"
            time.sleep(0.1)
        config_before = (tmp_path / "config.yaml").read_bytes()
        second = _train(tmp_path, "optim.lr=0.5")
        line = _one_error_line(second.returncode, second.stderr)
        assert f"another training (pid {first.pid}) is writing to {tmp_path}" in line, line
        assert (tmp_path / "config.yaml").read_bytes() == config_before  # nothing of the second one written
        assert "optim.lr=0.5" not in (tmp_path / ".hydra" / "overrides.yaml").read_text()
    finally:
        first.kill()
        first.wait()


# ---------------------------------------------------------------------------------------------------------------------
# Artifacts: checkpoints a user hands us are data, never code.
# ---------------------------------------------------------------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious(tmp: Path) -> Path:
    path = tmp / "evil.pt"
    torch.save({"format": "sidnet-checkpoint", "version": 2, "x": _RunsCode(tmp / "PWNED")}, path)
    return path


def _plain_pickle(tmp: Path) -> Path:
    path = tmp / "pickle.pt"
    path.write_bytes(pickle.dumps({"model": (os.system, ("true",))}))
    return path


def _random_bytes(tmp: Path) -> Path:
    path = tmp / "random.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def _foreign_state_dict(tmp: Path) -> Path:
    path = tmp / "resnet.pt"
    torch.save({"conv1.weight": torch.rand(4, 3, 3, 3)}, path)  # what torchvision's model zoo files look like
    return path


def _other_model_type(tmp: Path) -> Path:
    path = tmp / "other.pt"
    torch.save({"format": "sidnet-checkpoint", "version": 2, "model": {"name": "detr_r50", "anchors": [],
                "num_classes": 1, "input_size": 128, "kwargs": {}}, "model_state": {}, "epoch": 1,
                "config": {}}, path)  # fmt: skip
    return path


def _future_version(tmp: Path) -> Path:
    path = tmp / "future.pt"
    torch.save({"format": "sidnet-checkpoint", "version": 99, "model": {"name": "sidnet"}}, path)
    return path


CHECKPOINT_FAULTS = [
    ("pickle that runs code (torch.save)", _malicious, r"refused .*evil\.pt: it names Python objects \(.*system"),
    ("plain pickle with a callable", _plain_pickle, r"pickle\.pt (cannot be read|: it names)|refused .*pickle\.pt"),
    ("random bytes", _random_bytes, r"random\.pt cannot be read .*corrupt, truncated or not a torch file"),
    ("foreign state dict", _foreign_state_dict, r"resnet\.pt is not a SIDNet checkpoint"),
    ("checkpoint of another model type", _other_model_type, r"model 'detr_r50', which this sidnet does not know"),
    ("checkpoint from a newer sidnet", _future_version, r"future\.pt has checkpoint version 99 > 2; upgrade sidnet"),
]


@pytest.mark.parametrize("entry", ["evaluate", "export"])
@pytest.mark.parametrize("fault,build,message", CHECKPOINT_FAULTS, ids=[r[0] for r in CHECKPOINT_FAULTS])
def test_bad_checkpoint_one_line_and_no_code_runs(tmp_path, capsys, entry, fault, build, message):
    path = build(tmp_path)
    if entry == "evaluate":
        from train.evaluate import main

        argv = ["--checkpoint", str(path), "--out", str(tmp_path / "r.json")]
    else:
        from export.__main__ import main

        argv = ["--checkpoint", str(path), "--out", str(tmp_path / "export")]
    line = _one_error_line(*_run_main(main, argv, capsys))
    assert __import__("re").search(message, line), line
    assert not (tmp_path / "PWNED").exists(), "loading the checkpoint ran code"


def test_bad_checkpoint_on_resume_is_refused(tmp_path, capsys):
    from train.__main__ import main

    evil = _malicious(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".sidnet-run").write_text("")  # a run folder of ours whose last.pt was tampered with
    (tmp_path / "run" / "last.pt").write_bytes(evil.read_bytes())
    line = _one_error_line(*_run_main(main, [*TINY, f"hydra.run.dir={tmp_path / 'run'}", "resume=true"], capsys))
    assert "it names Python objects" in line and not (tmp_path / "PWNED").exists()


def test_version1_checkpoint_still_loads_and_resumes(tmp_path):
    """Checkpoints written before this format change (numpy RNG state inside) load without running code, and
    training resumes from them; the next save is version 2."""
    from sidnet.engine.trainer import Trainer
    from tests.test_train import _compose

    cfg = _compose([*TINY, "epochs=2", "max_steps_per_epoch=1"])
    trainer = Trainer(cfg, run_dir=tmp_path, project_root=ROOT)
    trainer.fit()
    state = trainer.state()
    state["rng"]["numpy"] = np.random.get_state()  # exactly what version 1 stored
    buf = io.BytesIO()
    torch.save({"format": "sidnet-checkpoint", "version": 1, **state, "metrics": {"AP50": np.float64(0.5)}}, buf)
    (tmp_path / "last.pt").write_bytes(buf.getvalue())
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "last.pt")  # really needs numpy
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["version"] == VERSION and loaded["metrics"]["AP50"] == 0.5
    np_state = np.random.get_state()
    resumed = Trainer(_compose([*TINY, "epochs=3", "max_steps_per_epoch=1", "resume=true"]), run_dir=tmp_path,
                      project_root=ROOT)  # fmt: skip
    resumed.resume(tmp_path / "last.pt")
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    resumed.fit()
    assert load_checkpoint(tmp_path / "last.pt")["version"] == VERSION
    upgrade = subprocess.run([sys.executable, "-m", "sidnet.checkpoint", "--upgrade",
                              str(tmp_path / "last.pt")], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert upgrade.returncode == 0, upgrade.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Export flags and output folders.
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from sidnet.engine.trainer import train
    from tests.test_train import _compose

    run_dir = tmp_path_factory.mktemp("tiny")
    train(_compose([*TINY, "epochs=1", "max_steps_per_epoch=1"]), run_dir=run_dir, project_root=ROOT)
    return run_dir / "last.pt"


EXPORT_FAULTS = [
    ("--precision typo", ["--precision", "fp61"], r"unsupported precision 'fp61'"),
    ("--backend typo", ["--backend", "tensorrtt"], r"unsupported backend 'tensorrtt': use onnx"),
    ("--target typo", ["--target", "plugin"], r"target"),
    ("unknown flag", ["--precison", "fp16"], r"unrecognised argument"),
    ("override typo", ["batch.maxx=4"], r"bad configuration"),
]


@pytest.mark.parametrize("fault,argv,message", EXPORT_FAULTS, ids=[r[0] for r in EXPORT_FAULTS])
def test_export_flag_fault_one_line(tmp_path, capsys, tiny_checkpoint, fault, argv, message):
    from export.__main__ import main

    line = _one_error_line(*_run_main(main, ["--checkpoint", str(tiny_checkpoint), *argv], capsys))
    assert __import__("re").search(message, line), line


def test_unwritable_output_folder(tmp_path, capsys, tiny_checkpoint):
    """A folder without write permission (or, as root, where permissions do not bind: a /sys path, which refuses
    even root): one line naming it, before any export work."""
    from export.__main__ import main

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    target = locked / "export" if not os.access(locked, os.W_OK) else Path("/sys/sidnet-fault-test/export")
    try:
        line = _one_error_line(*_run_main(main, ["--checkpoint", str(tiny_checkpoint), "--out", str(target)], capsys))
        assert f"output folder {target} cannot be written" in line and "--out" in line, line
    finally:
        locked.chmod(0o700)


def test_output_path_that_is_a_file(tmp_path, capsys, tiny_checkpoint):
    from export.__main__ import main

    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    line = _one_error_line(*_run_main(main, ["--checkpoint", str(tiny_checkpoint), "--out", str(blocker)], capsys))
    assert str(blocker) in line, line


def test_verbose_flag_shows_the_traceback(tmp_path):
    bad = _random_bytes(tmp_path)
    quiet = subprocess.run([sys.executable, "-m", "train.evaluate", "--checkpoint", str(bad)], cwd=ROOT,
                           capture_output=True, text=True)  # fmt: skip
    loud = subprocess.run([sys.executable, "-m", "train.evaluate", "--checkpoint", str(bad), "-v"], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert quiet.returncode != 0 and "Traceback" not in quiet.stderr and quiet.stderr.count("\n") == 1
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "CheckpointError" in loud.stderr


def _foreign_onnx(tmp: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 64, 64])
    path = tmp / "classifier.onnx"
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])), path)
    return path


def test_onnx_from_another_model_is_refused_by_the_runtime(tmp_path, capsys, shared_data):
    """An ONNX that `python -m export` did not write (no SIDNet metadata): one line, nothing run or written.
    Engine sidecars that do not match are rows of tests/test_runtime.py::test_tensorrt_sidecar_checks_run_before_\
deserialising (TensorRT version, compute capability, engine hash, plugin library, INT8 manifest)."""
    from deploy.__main__ import main

    video = shared_data / "video" / "pedestrians_200.mp4"
    out = tmp_path / "out"
    argv = [str(_foreign_onnx(tmp_path)), str(video), "--max-frames", "2", "--out", str(out)]
    line = _one_error_line(*_run_main(main, argv, capsys))
    assert "classifier.onnx has no SIDNet metadata" in line and "python -m export" in line, line
    assert not (out / "summary.json").exists()


def test_ctrl_c_inside_an_extension_import_is_reported_as_the_interrupt(capsys):
    """A Ctrl-C while a C extension initialises surfaces as ``ImportError: initialization failed`` with the interrupt
    chained (pybind11): the entry points say what the interrupt stopped (exit 130), not "internal error"."""
    from sidnet.cli import EXIT_INTERRUPTED, run_guarded

    def importing():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as stop:
            raise ImportError("initialization failed") from stop

    with pytest.raises(SystemExit) as out:
        run_guarded(importing, verbose=False, interrupted="export interrupted: nothing was added")
    assert out.value.code == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "error: export interrupted: nothing was added"

    def broken():
        raise ImportError("initialization failed")

    with pytest.raises(SystemExit) as out:
        run_guarded(broken, verbose=False, interrupted="export interrupted")
    assert str(out.value.code).startswith("error: internal error (ImportError: initialization failed)")
