"""Fault campaign, round 2: names and paths, special files, artifacts that point outside, ONNX metadata, zones,
streams, sizes and Ctrl-C, through the real commands (``python -m train / train.evaluate / export / deploy``).

Table-driven: each row builds one hostile or careless input in a fresh temporary project folder (the process's
working folder, so anything written relative to it lands there), runs the real command as a subprocess, and asserts
(1) exactly one ``error: ...`` line matching the row's message, never a traceback or an "internal error", and
(2) that nothing changed outside the folder the row allows: a before/after snapshot (type, size, mtime, content
hash) of the temporary project folder, the shared tiny checkpoint and ONNX folders, the shared video folder and the
repository's ``runs/`` and ``outputs/``. Special files (FIFOs, sockets) are never opened by the snapshot.

The rows run concurrently (a thread pool over subprocesses; each row has its own folder), so the campaign costs
about its slowest rows. The shared artifacts (one tiny checkpoint, its ONNX export) are built once per session by
``tests/conftest.py``.
"""

# ruff: noqa: E501  (the table reads best one row per line)
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import write_image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = ROOT / "conf" / "data" / "sample.yaml"
TRAIN_TINY = ["model=sidnet", "model.anchors=[[12,24],[30,60],[70,110]]", "model.input_size=128",
              "model.kwargs.width=0.125", "data=sample", "batch_size=2", "workers=0", "device=cpu",
              "tensorboard=false", "epochs=1", "max_steps_per_epoch=1"]  # fmt: skip


@dataclass
class Ctx:
    """What a row builds with: its own folder ``tmp`` (the process's cwd) and the shared, read-only artifacts."""

    tmp: Path
    ckpt: Path
    onnx: Path
    video: Path
    env: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def images(self, name: str = "frames", n: int = 2, suffix: str = ".jpg") -> Path:
        folder = self.tmp / name
        for i in range(n):
            write_image(folder / f"f{i}{suffix}", 64, 48, seed=i)
        return folder


@dataclass
class Row:
    id: str
    build: Callable[[Ctx], list[str]]  # -> argv after `python`
    message: str  # regex the one error line must match
    allowed: tuple[str, ...] = ()  # paths under tmp that may change (prefixes)
    during: Callable[[Ctx], None] | None = None  # runs while the process does (e.g. sends Ctrl-C)
    after: Callable[[Ctx], None] | None = None  # extra assertions on what was left
    code: int | None = None  # expected exit status (default: 1 or 2)


# -- builders ---------------------------------------------------------------------------------------------------------
def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def _train(*extra: str) -> Callable[[Ctx], list[str]]:
    return lambda c: ["-m", "train", *TRAIN_TINY, *extra]


def _deploy(*extra: str, source: Callable[[Ctx], str] | None = None) -> Callable[[Ctx], list[str]]:
    def build(c: Ctx) -> list[str]:
        src = source(c) if source else f"cam={c.video}"
        return ["-m", "deploy", str(c.onnx), src, "--out", str(c.tmp / "out"), "--no-progress", "--max-frames", "2",
                *extra]  # fmt: skip

    return build


def _zones(text: str | bytes) -> Callable[[Ctx], list[str]]:
    def build(c: Ctx) -> list[str]:
        (c.tmp / "zones.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
        return _deploy("--zones", str(c.tmp / "zones.yaml"))(c)

    return build


def _zone_poly(points: str, extra: str = "") -> Callable[[Ctx], list[str]]:
    return _zones(f"{extra}streams:\n  cam:\n    - name: door\n      polygon: {points}\n")


SQUARE = "[[10, 10], [200, 10], [200, 200], [10, 200]]"


def _onnx_meta(**changes) -> Callable[[Ctx], list[str]]:
    """The shared ONNX with metadata values replaced (raw strings), run by deploy."""

    def build(c: Ctx) -> list[str]:
        import onnx

        m = onnx.load(str(c.onnx))
        props = {p.key: p.value for p in m.metadata_props}
        props.update(changes)
        del m.metadata_props[:]
        for k, v in props.items():
            m.metadata_props.add(key=k, value=v)
        path = c.tmp / "model.onnx"
        onnx.save(m, str(path))
        return ["-m", "deploy", str(path), f"cam={c.video}", "--out", str(c.tmp / "out"), "--no-progress",
                "--max-frames", "1"]  # fmt: skip

    return build


def _onnx_external(c: Ctx) -> list[str]:
    import onnx

    m = onnx.load(str(c.onnx))
    t = max(m.graph.initializer, key=lambda t: len(t.raw_data))
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value="../../../../etc/hostname")
    path = c.tmp / "model.onnx"
    path.write_bytes(m.SerializeToString())
    return ["-m", "deploy", str(path), f"cam={c.video}", "--out", str(c.tmp / "out"), "--no-progress"]


def _onnx_bytes(data: Callable[[Ctx], bytes], *, cmd: str = "deploy") -> Callable[[Ctx], list[str]]:
    def build(c: Ctx) -> list[str]:
        path = c.tmp / "model.onnx"
        path.write_bytes(data(c))
        if cmd == "evaluate":
            return ["-m", "train.evaluate", "--onnx", str(path), "--data", str(SAMPLE_DATA)]
        return ["-m", "deploy", str(path), f"cam={c.video}", "--out", str(c.tmp / "out"), "--no-progress"]

    return build


def _qdq(c: Ctx, mutate: Callable[[dict, Path], None]) -> list[str]:
    """A tiny Q/DQ ONNX + FP32 ONNX + calibration cache + a manifest that matches them; ``mutate`` damages it."""
    import onnx
    from onnx import TensorProto, helper

    from sidnet.io import sha256_file
    from sidnet.quant.manifest import FORMAT, MANIFEST_NAME, graph_sha256

    art = c.tmp / "int8"
    art.mkdir()
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 128, 128])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 128, 128])
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.01])
    zero = helper.make_tensor("z", TensorProto.INT8, [], [0])
    nodes = [helper.make_node("QuantizeLinear", ["images", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]  # fmt: skip
    qdq = helper.make_model(helper.make_graph(nodes, "qdq", [x], [y], [scale, zero]))
    for k, v in {"input_size": "128", "preprocessing": "letterbox RGB /255"}.items():
        qdq.metadata_props.add(key=k, value=v)
    onnx.save(qdq, str(art / "model.onnx"))
    fp32 = helper.make_model(helper.make_graph([helper.make_node("Relu", ["images"], ["y"])], "fp32", [x], [y]))
    onnx.save(fp32, str(art / "model_fp32.onnx"))
    (art / "calibration.cache").write_text("TRT-100100-EntropyCalibration2\nimages: 3c23d70a\n")
    m = {"format": FORMAT, "version": 1, "preprocessing": {"input_size": 128, "text": "letterbox RGB /255"},
         "qdq_onnx": {"file": "model.onnx", "sha256": sha256_file(art / "model.onnx")},
         "fp32_onnx": {"file": "model_fp32.onnx", "graph_sha256": graph_sha256(fp32)},
         "cache": {"file": "calibration.cache", "sha256": sha256_file(art / "calibration.cache")}}  # fmt: skip
    mutate(m, art)
    if not (art / MANIFEST_NAME).exists():
        (art / MANIFEST_NAME).write_text(json.dumps(m))
    return ["-m", "train.evaluate", "--onnx", str(art / "model.onnx"), "--data", str(SAMPLE_DATA)]


def _manifest(mutate: Callable[[dict, Path], None]) -> Callable[[Ctx], list[str]]:
    return lambda c: _qdq(c, mutate)


def _set(*keys_value):
    *keys, value = keys_value

    def mutate(m: dict, art: Path) -> None:
        node = m
        for k in keys[:-1]:
            node = node[k]
        if value is _DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return mutate


_DELETE = object()


def _data_yaml(text: str) -> Callable[[Ctx], list[str]]:
    def build(c: Ctx) -> list[str]:
        (c.tmp / "data.yaml").write_text(text)
        return ["-m", "train.evaluate", "--checkpoint", str(c.ckpt), "--data", str(c.tmp / "data.yaml"),
                "--out", str(c.tmp / "report.json")]  # fmt: skip

    return build


def _yolo_split(c: Ctx, label_fault: Callable[[Path], None]) -> list[str]:
    images, labels = c.tmp / "ds" / "images", c.tmp / "ds" / "labels"
    labels.mkdir(parents=True)
    for i in range(2):
        write_image(images / f"im{i}.jpg", 64, 48, seed=i)
    (labels / "im0.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    label_fault(labels / "im1.txt")
    (c.tmp / "data.yaml").write_text(f"root: {c.tmp / 'ds'}\ntrain: {{images: images, labels: labels}}\n"
                                     "val: {images: images, labels: labels}\n")  # fmt: skip
    return ["-m", "train.evaluate", "--checkpoint", str(c.ckpt), "--data", str(c.tmp / "data.yaml"),
            "--out", str(c.tmp / "report.json")]  # fmt: skip


def _png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming ``width`` x ``height`` (no pixel data): a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _silent_server() -> int:
    """A TCP port that accepts connections and never sends a byte (a camera that hangs after the handshake)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held = []

    def serve() -> None:
        while True:
            conn, _ = srv.accept()
            held.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# -- Ctrl-C --------------------------------------------------------------------------------------------------------------
def _sigint_when(predicate: Callable[[Ctx], bool], timeout: float = 240.0) -> Callable[[Ctx], None]:
    def during(c: Ctx) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end and c.proc.poll() is None:
            if predicate(c):
                c.proc.send_signal(signal.SIGINT)
                return
            time.sleep(0.05)

    return during


def _staged_onnx(c: Ctx) -> bool:
    return any((p / "model.onnx").is_file() for p in (c.tmp / "exp").glob(".partial-*"))


def _jsonl_has_lines(c: Ctx) -> bool:
    p = c.tmp / "out" / "cam.jsonl"
    return p.is_file() and p.stat().st_size > 0


def _export_left_nothing(c: Ctx) -> None:
    assert sorted(p.name for p in (c.tmp / "exp").iterdir()) == ["old.txt"], list((c.tmp / "exp").iterdir())


def _deploy_finished(c: Ctx) -> None:
    summary = json.loads((c.tmp / "out" / "summary.json").read_text())
    lines = (c.tmp / "out" / "cam.jsonl").read_text().splitlines()
    assert summary["interrupted"] is True and summary["frames"]["cam"] == len(lines) >= 1
    assert all(json.loads(x)["frame"] == i for i, x in enumerate(lines))


def _still_fifo(rel: str) -> Callable[[Ctx], None]:
    return lambda c: stat.S_ISFIFO(os.lstat(c.tmp / rel).st_mode) or pytest.fail(f"{rel} was replaced")


def _prepare(build: Callable[[Ctx], list[str]], setup: Callable[[Ctx], None]) -> Callable[[Ctx], list[str]]:
    def both(c: Ctx) -> list[str]:
        setup(c)
        return build(c)

    return both


def _mkdir(rel: str, *files: str) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        (c.tmp / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            (c.tmp / rel / f).write_text("a user's file\n")

    return setup


def _export(*extra: str) -> Callable[[Ctx], list[str]]:
    return lambda c: ["-m", "export", "--checkpoint", str(c.ckpt), "--out", str(c.tmp / "exp"), *extra]


def _evaluate(*extra: str) -> Callable[[Ctx], list[str]]:
    return lambda c: ["-m", "train.evaluate", "--checkpoint", str(c.ckpt), "--data", str(SAMPLE_DATA), *extra]


def _big_spec_checkpoint(c: Ctx) -> list[str]:
    import torch

    state = torch.load(c.ckpt, weights_only=True)
    state["model"]["input_size"] = 65536
    path = c.tmp / "huge.pt"
    torch.save(state, path)
    return ["-m", "train.evaluate", "--checkpoint", str(path), "--out", str(c.tmp / "r.json")]


def _fifo_source(c: Ctx) -> str:
    folder = c.images()
    _fifo(folder / "zz.jpg")
    return f"cam={folder}"


def _symlink_to_device(c: Ctx) -> str:
    folder = c.images()
    (folder / "zz.jpg").symlink_to("/dev/zero")
    return f"cam={folder}"


def _subfolder_source(c: Ctx) -> str:
    folder = c.images()
    (folder / "sub.png").mkdir()
    return f"cam={folder}"


def _same_stem(c: Ctx) -> str:
    folder = c.images(n=1)
    write_image(folder / "f0.jpeg", 64, 48, seed=3)
    return f"cam={folder}"


def _undecodable(c: Ctx) -> str:
    folder = c.images()
    (folder / "a1.jpg").write_text("not an image\n")  # sorts first: refused before any output
    return f"cam={folder}"


def _bomb_png(c: Ctx) -> str:
    folder = c.images(n=1)
    (folder / "a9.png").write_bytes(_png_header(30000, 30000))
    return f"cam={folder}"


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))  # fmt: skip


ROWS = [
    # -- names, paths and run folders (train) --
    Row("train name a/b", _train("name=a/b"), r"name='a/b' is not a single folder name"),
    Row("train name ..", _train("name=.."), r"name='\.\.' is not a single folder name"),
    Row("train name absolute", _train("name=/tmp/sidnet-escape"), r"name='/tmp/sidnet-escape' is not a single"),
    Row("train run.dir = a data folder", lambda c: _train(f"hydra.run.dir={c.images('photos')}")(c),
        r"photos exists and is not a SIDNet run folder"),
    Row("train run.dir = a file", _prepare(lambda c: _train(f"hydra.run.dir={c.tmp / 'notes.txt'}")(c),
                                            lambda c: (c.tmp / "notes.txt").write_text("mine\n")),
        r"run folder .*notes\.txt exists and is not a folder"),
    Row("train run.dir reads env", _train("hydra.run.dir=/tmp/${oc.env:USER}"),
        r"hydra\.run\.dir=.*reads the environment"),
    Row("train optim.name reads env", _train("optim.name=${oc.env:HOME}"), r"optim\.name=.*reads the environment"),
    Row("train data.root reads env", _train("data.root=${oc.env:HOME}"), r"data\.root=.*reads the environment"),
    Row("train input_size 4128", _train("model.input_size=4128"), r"input size 4128 \(model\.input_size\) .*32\.\.4096"),
    Row("train input_size 0", _train("model.input_size=0"), r"input size 0 \(model\.input_size\)"),
    Row("train anchors file is a FIFO", _prepare(lambda c: [*_train()(c), f"model.anchors={c.tmp / 'a.yaml'}"],
                                                  lambda c: _fifo(c.tmp / "a.yaml")),
        r"anchors file .*a\.yaml is a FIFO, device or socket, not a regular file", after=_still_fifo("a.yaml")),
    Row("train anchors alias bomb", _prepare(lambda c: [*_train()(c), f"model.anchors={c.tmp / 'a.yaml'}"],
                                              lambda c: (c.tmp / "a.yaml").write_text(ALIAS_BOMB)),
        r"a\.yaml uses more than 64 YAML aliases"),
    # -- export config and outputs --
    Row("export --out reads env", _export("--out", "${oc.env:HOME}/x"), r"out=.*reads the environment"),
    Row("export checkpoint override reads env", lambda c: ["-m", "export", "checkpoint=${oc.env:HOME}"],
        r"checkpoint=.*reads the environment"),
    Row("export random-init input_size 8192", lambda c: ["-m", "export", "--random-init", "--model", "sidnet",
                                                         "model.input_size=8192", "--out", str(c.tmp / "exp")],
        r"input size 8192 \(model\.input_size\) must be a multiple of 32 in 32\.\.4096"),
    Row("export model.onnx is a FIFO", _prepare(_export(), lambda c: _fifo(c.tmp / "exp" / "model.onnx")),
        r"output .*exp/model\.onnx exists and is a special file", after=_still_fifo("exp/model.onnx")),
    Row("export report.json is a folder", _prepare(_export(), _mkdir("exp/report.json")),
        r"output .*exp/report\.json exists and is a folder"),
    Row("export Ctrl-C after model.onnx", _prepare(_export(), _mkdir("exp", "old.txt")),
        r"export interrupted: nothing was added to .*exp", during=_sigint_when(_staged_onnx),
        after=_export_left_nothing, code=130),
    Row("export undecodable calibration file", _prepare(lambda c: _export("--precision", "int8", "--calib-images",
                                                                   str(c.images("calib", n=3)), "--calib-batch-size",
                                                                   "4")(c),
                                                        lambda c: (_mkdir("exp", "old.txt")(c), (c.tmp / "calib").mkdir(),
                                                                   (c.tmp / "calib" / "a.jpg").write_text("no"))),
        r"3 calibration image\(s\) for a batch of 4", after=_export_left_nothing),
    # -- evaluate --
    Row("evaluate --conf 0", _evaluate("--conf", "0"), r"argument --conf: 0 is outside \(0, 1\]"),
    Row("evaluate --conf inf", _evaluate("--conf", "inf"), r"argument --conf: inf is outside \(0, 1\]"),
    Row("evaluate --conf text", _evaluate("--conf", "high"), r"argument --conf: 'high' is not a number"),
    Row("evaluate --batch-size 0", _evaluate("--batch-size", "0"), r"--batch-size: 0 must be 1 or more"),
    Row("evaluate --out a folder", _prepare(lambda c: _evaluate("--out", str(c.tmp / "rep"))(c), _mkdir("rep")),
        r"output .*rep exists and is a folder"),
    Row("evaluate --out a symlink", _prepare(lambda c: _evaluate("--out", str(c.tmp / "r.json"))(c),
                                             lambda c: (c.tmp / "r.json").symlink_to(c.tmp / "elsewhere.json")),
        r"output .*r\.json exists and is a symlink"),
    Row("evaluate --out /dev/null", _evaluate("--out", "/dev/null"), r"output /dev/null exists and is a special file"),
    Row("evaluate Ctrl-C in the report write", lambda c: [*_evaluate("--out", str(c.tmp / "r.json"))(c)],
        r"evaluation interrupted: no report was written", code=130,
        after=lambda c: not (c.tmp / "r.json").exists() or pytest.fail("half a report")),
    Row("evaluate checkpoint input_size 65536", _big_spec_checkpoint,
        r"input size 65536 \(the checkpoint's model\.input_size\)"),
    Row("evaluate data YAML is a FIFO", _prepare(lambda c: _evaluate("--data", str(c.tmp / "d.yaml"))(c),
                                                 lambda c: _fifo(c.tmp / "d.yaml")),
        r"data YAML .*d\.yaml is a FIFO, device or socket", after=_still_fifo("d.yaml")),
    Row("evaluate data YAML alias bomb", _data_yaml(ALIAS_BOMB), r"data\.yaml uses more than 64 YAML aliases"),
    Row("evaluate data YAML reads env", _data_yaml("root: ${oc.env:HOME}\ntrain: {images: x}\nval: {images: x}\n"),
        r"root=.*data\.yaml reads the environment"),
    Row("evaluate data YAML is a list", _data_yaml("- a\n- b\n"), r"data YAML .*data\.yaml must be a mapping with at least 'train' and 'val'"),
    Row("evaluate label file is a FIFO", lambda c: _yolo_split(c, _fifo),
        r"unreadable label file .*im1\.txt .*FIFO, device or socket", after=_still_fifo("ds/labels/im1.txt")),
    Row("evaluate label file 17 MiB", lambda c: _yolo_split(c, lambda p: p.write_bytes(b"0 0.5 0.5 0.1 0.1\n" * 10**6)),
        r"unreadable label file .*im1\.txt .*over the 16 MiB bound"),
    Row("evaluate ONNX input_size 8192", _onnx_bytes(lambda c: _with_meta(c, input_size="8192"), cmd="evaluate"),
        r"input size 8192 \(metadata of .*model\.onnx\)"),
    Row("evaluate ONNX is a FIFO", lambda c: _fifo_onnx(c), r"model\.onnx is a FIFO, device or socket",
        after=_still_fifo("model.onnx")),
    # -- INT8 manifests --
    Row("manifest fp32 ../ escape", _manifest(_set("fp32_onnx", "file", "../../../../etc/hostname")),
        r"\(fp32_onnx\) names '\.\./\.\./\.\./\.\./etc/hostname', outside its folder"),
    Row("manifest fp32 absolute", _manifest(_set("fp32_onnx", "file", "/etc/hostname")),
        r"\(fp32_onnx\) names '/etc/hostname', outside its folder"),
    Row("manifest cache symlink out", _manifest(lambda m, art: (art / "link.cache").symlink_to("/etc/hostname")
                                                or _set("cache", "file", "link.cache")(m, art)),
        r"\(cache\) names 'link\.cache', outside its folder"),
    Row("manifest cache is a folder", _manifest(lambda m, art: (art / "c.d").mkdir() or _set("cache", "file", "c.d")(m, art)),
        r"\(cache\) names 'c\.d' in .*, which is not a regular file"),
    Row("manifest cache missing", _manifest(lambda m, art: (art / "calibration.cache").unlink()),
        r"\(cache\) names 'calibration\.cache', which is missing"),
    Row("manifest lacks cache", _manifest(_set("cache", _DELETE)), r"int8_manifest\.json lacks cache"),
    Row("manifest lacks preprocessing", _manifest(_set("preprocessing", _DELETE)), r"lacks preprocessing"),
    Row("manifest nested 100 deep", _manifest(lambda m, art: (art / "int8_manifest.json").write_text(
        '{"format": "sidnet-int8-manifest", "x": ' + "[" * 100 + "]" * 100 + "}")),
        r"nests JSON deeper than 32 levels"),
    Row("manifest is a FIFO", _manifest(lambda m, art: _fifo(art / "int8_manifest.json")),
        r"int8_manifest\.json is a FIFO, device or socket", after=_still_fifo("int8/int8_manifest.json")),
    # -- ONNX artifacts in deploy --
    Row("ONNX external data escape", _onnx_external, r"keeps tensor .* in external data files"),
    Row("ONNX metadata input_size 100", _onnx_meta(input_size="100"), r"input size 100 \(ONNX metadata of"),
    Row("ONNX metadata input_size text", _onnx_meta(input_size='"big"'), r"input size 'big' \(ONNX metadata of"),
    Row("ONNX metadata topk 1e9", _onnx_meta(topk="1000000000"), r"topk 1000000000; .*topk 1\.\.100000"),
    Row("ONNX metadata num_classes 0", _onnx_meta(num_classes="0"), r"num_classes 0, topk \d+; .*1\.\.1000 classes"),
    Row("ONNX metadata anchors nested", _onnx_meta(anchors="[" * 40 + "]" * 40), r"anchors.* nests JSON deeper"),
    Row("ONNX metadata class_names garbled", _onnx_meta(class_names="[\"person\","), r"class_names.* is not valid JSON"),
    Row("ONNX truncated", _onnx_bytes(lambda c: c.onnx.read_bytes()[:5000]), r"model\.onnx is not a readable ONNX"),
    # -- deploy flags --
    Row("deploy --max-frames 0", _deploy("--max-frames", "0"), r"--max-frames: 0 must be 1 or more"),
    Row("deploy --batch 0", _deploy("--batch", "0"), r"--batch: 0 must be 1 or more"),
    Row("deploy --conf 1.5", _deploy("--conf", "1.5"), r"--conf: 1\.5 is outside \(0, 1\]"),
    Row("deploy --nms-iou nan", _deploy("--nms-iou", "nan"), r"--nms-iou: nan is outside \(0, 1\]"),
    Row("deploy --reconnect-retries -1", _deploy("--reconnect-retries", "-1"), r"must be 0 or more"),
    Row("deploy --first-frame-timeout 0", _deploy("--first-frame-timeout", "0"), r"--first-frame-timeout: 0 must be a positive number"),
    Row("deploy events.jsonl FIFO with --force", _prepare(_deploy("--force"), lambda c: _fifo(c.tmp / "out" / "events.jsonl")),
        r"output .*events\.jsonl exists and is a special file", after=_still_fifo("out/events.jsonl")),
    Row("deploy cam.mp4 folder with --force", _prepare(_deploy("--force"), _mkdir("out/cam.mp4")),
        r"output .*cam\.mp4 exists and is a folder"),
    Row("deploy Ctrl-C mid-stream", lambda c: _deploy()(c)[:-2], r"deploy interrupted after \d+ frames: the outputs",
        allowed=("out",), during=_sigint_when(_jsonl_has_lines), after=_deploy_finished, code=130),
    # -- deploy sources --
    Row("source folder with a FIFO", _deploy(source=_fifo_source), r"zz\.jpg in source folder .* not a regular file",
        after=_still_fifo("frames/zz.jpg")),
    Row("source folder symlink to /dev/zero", _deploy(source=_symlink_to_device), r"zz\.jpg in source folder"),
    Row("source folder with a sub-folder", _deploy(source=_subfolder_source), r"sub\.png in source folder"),
    Row("source f0.jpg and f0.jpeg", _deploy(source=_same_stem), r"f0\.jpeg and f0\.jpg .* share the name 'f0'"),
    Row("source undecodable image", _deploy(source=_undecodable), r"cannot decode image .*a1\.jpg"),
    Row("source 30000x30000 PNG header", _deploy(source=_bomb_png), r"a9\.png is over the 64 MP bound on a decoded frame"),
    Row("stream port closed", _deploy(source=lambda c: f"cam=rtsp://127.0.0.1:{_closed_port()}/live"),
        r"stream cam \(rtsp://127\.0\.0\.1:\d+/live\) could not be opened and never delivered a frame"),
    Row("stream accepts, never answers", _deploy("--first-frame-timeout", "3",
                                                 source=lambda c: f"cam=http://127.0.0.1:{_silent_server()}/x.mjpg"),
        r"stream cam \(http://127\.0\.0\.1:\d+/x\.mjpg\) .*never delivered a frame"),
    # -- zones --
    Row("zone bow-tie", _zone_poly("[[10, 10], [200, 200], [200, 10], [10, 200]]"),
        r"zone 'door' of stream 'cam': its polygon crosses itself \(edge 0-1 meets edge 2-3\)"),
    Row("zone repeated point", _zone_poly("[[10, 10], [200, 10], [200, 10], [200, 200], [10, 200]]"),
        r"zone 'door' .* crosses itself"),
    Row("zone collinear", _zone_poly("[[10, 10], [100, 10], [200, 10]]"), r"zone 'door' .* crosses itself"),
    Row("zone 3-number point", _zone_poly("[[10, 10, 1], [200, 10], [200, 200]]"),
        r"zone 'door' of stream 'cam': point 0 is \[10, 10, 1\]"),
    Row("zone nan point", _zone_poly("[[10, 10], [.nan, 10], [200, 200]]"), r"point 1 is \[nan, 10\]"),
    Row("zone 300 points", _zone_poly(str([[i, 10 + (i % 2)] for i in range(300)])), r"3\.\.256 \[x, y\] points, got 300"),
    Row("zones debounce 2.5", _zone_poly(SQUARE, "debounce_frames: 2.5\n"), r"debounce_frames: 2\.5 must be a whole"),
    Row("zones debounce true", _zone_poly(SQUARE, "debounce_frames: true\n"), r"debounce_frames: True must be"),
    Row("zones cooldown -1", _zone_poly(SQUARE, "cooldown_s: -1\n"), r"cooldown_s: -1 must be a finite number"),
    Row("zones classes string", _zone_poly(SQUARE, "classes: person\n"), r"classes: 'person' must be a list"),
    Row("zones stream is a mapping", _zones("streams:\n  cam: {name: door}\n"), r"stream 'cam' must hold a list"),
    Row("zone key typo", _zones(f"streams:\n  cam:\n    - name: door\n      polgon: {SQUARE}\n"),
        r"a zone is a mapping with name: and polygon: only"),
    Row("zones duplicate names", _zones(f"streams:\n  cam:\n    - {{name: a, polygon: {SQUARE}}}\n"
                                        f"    - {{name: a, polygon: {SQUARE}}}\n"), r"two zones named alike"),
    Row("zones alias bomb", _zones(ALIAS_BOMB), r"zones\.yaml uses more than 64 YAML aliases"),
    Row("zones not UTF-8", _zones(b"streams: {}\n# caf\xe9\n"),
        r"zones\.yaml is not UTF-8 text"),
    Row("zones 5 MiB", _zones("streams: {}\n" + "#" * (5 << 20) + "\n"), r"over the 4 MiB bound for a yaml file"),
    Row("zones file is a folder", _prepare(lambda c: _deploy("--zones", str(c.tmp / "z"))(c), _mkdir("z")),
        r"zones file .*z is a folder, not a regular file"),
]


def _with_meta(c: Ctx, **changes) -> bytes:
    import onnx

    m = onnx.load(str(c.onnx))
    for p in m.metadata_props:
        if p.key in changes:
            p.value = changes[p.key]
    return m.SerializeToString()


def _fifo_onnx(c: Ctx) -> list[str]:
    _fifo(c.tmp / "model.onnx")
    return ["-m", "train.evaluate", "--onnx", str(c.tmp / "model.onnx"), "--data", str(SAMPLE_DATA)]


def _row_env(row: Row) -> dict:
    if row.id == "evaluate Ctrl-C in the report write":
        return {"SIDNET_FAULT": "sigint:r.json:1"}
    return {}


# -- the snapshot --------------------------------------------------------------------------------------------------------
def snapshot(*roots: Path) -> dict[str, tuple]:
    """path -> (kind, size, mtime_ns, sha256 of a regular file's bytes) for every entry under ``roots``, without
    following symlinks and without opening anything but regular files."""
    out: dict[str, tuple] = {}
    for root in roots:
        if not (root.exists() or root.is_symlink()):
            out[str(root)] = ("absent",)
            continue
        stack = [root]
        while stack:
            p = stack.pop()
            st = os.lstat(p)
            digest = None
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if st.st_size < 64 << 20 else None
            elif stat.S_ISDIR(st.st_mode):
                stack.extend(p.iterdir())
            kind = stat.S_IFMT(st.st_mode)
            out[str(p)] = (kind, st.st_size if stat.S_ISREG(st.st_mode) else 0,
                           st.st_mtime_ns if not stat.S_ISDIR(st.st_mode) else 0, digest)  # fmt: skip
    return out


@dataclass
class Result:
    returncode: int
    stderr: str
    before: dict
    after: dict
    seconds: float
    ctx: Ctx


def _run_row(row: Row, ctx: Ctx, watched: list[Path]) -> Result:
    argv = row.build(ctx)
    before = snapshot(ctx.tmp, *watched)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1", **_row_env(row)}
    env.pop("SIDNET_KERNELS_LIB", None)
    t0 = time.monotonic()
    ctx.proc = subprocess.Popen([sys.executable, *argv], cwd=ctx.tmp, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    if row.during is not None:
        row.during(ctx)
    try:
        _, stderr = ctx.proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(ctx.proc.pid, signal.SIGKILL)
        _, stderr = ctx.proc.communicate()
        stderr += "\n[row timed out after 300 s]"
    return Result(ctx.proc.returncode, stderr, before, snapshot(ctx.tmp, *watched), time.monotonic() - t0, ctx)


@pytest.fixture(scope="module")
def results(request, tmp_path_factory, tiny_checkpoint, tiny_onnx, shared_data) -> dict[str, Result]:
    """Run every selected row at once (a few processes at a time); each row gets its own folder."""
    wanted = {item.callspec.params["row"].id for item in request.session.items
              if getattr(item, "originalname", "") == "test_fault" and hasattr(item, "callspec")}  # fmt: skip
    video_dir = tmp_path_factory.mktemp("video")
    video = video_dir / "clip.mp4"
    video.write_bytes((shared_data / "video" / "pedestrians_200.mp4").read_bytes())
    watched = [tiny_checkpoint.parent, tiny_onnx.parent, video_dir, ROOT / "runs", ROOT / "outputs"]
    rows = [r for r in ROWS if r.id in wanted]
    workers = max(2, min(6, (os.cpu_count() or 2) * 2))
    t0 = time.monotonic()
    # The Ctrl-C rows need children that turn SIGINT into KeyboardInterrupt. A pytest started in the background by a
    # non-interactive shell (`bash .ci/run &`, nohup) ignores SIGINT, and an ignored signal stays ignored across exec:
    # the children would never see Ctrl-C. A caught signal is reset to the default on exec, so catch it here.
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with ThreadPoolExecutor(workers) as pool:
            futures = {}
            for row in rows:
                tmp = tmp_path_factory.mktemp(re.sub(r"\W+", "_", row.id)[:40])
                ctx = Ctx(tmp=tmp, ckpt=tiny_checkpoint, onnx=tiny_onnx, video=video)
                futures[row.id] = pool.submit(_run_row, row, ctx, watched)
            out = {rid: f.result() for rid, f in futures.items()}
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    slowest = sorted(out.items(), key=lambda kv: -kv[1].seconds)[:3]
    print(f"\nround-2 fault campaign: {len(rows)} rows in {time.monotonic() - t0:.0f} s wall with {workers} workers; "
          f"slowest: {', '.join(f'{k} {v.seconds:.0f} s' for k, v in slowest)}")  # fmt: skip
    return out


def _changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_fault(results, row):
    r = results[row.id]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert "Traceback" not in r.stderr and len(errors) == 1 and lines[-1] == errors[0], r.stderr[-3000:]
    line = errors[0]
    assert "internal error" not in line, line
    assert re.search(row.message, line), (row.message, line)
    assert r.returncode == (row.code if row.code is not None else r.returncode) and r.returncode in (1, 2, 130), (
        r.returncode, line)  # fmt: skip
    allowed = [str(r.ctx.tmp / a) for a in row.allowed]
    changed = [p for p in _changed(r.before, r.after) if not any(p == a or p.startswith(a + "/") for a in allowed)]
    assert not changed, f"changed outside {row.allowed or 'nothing'}: {changed[:8]}"
    if row.after is not None:
        row.after(r.ctx)


def test_campaign_size():
    """The issue asks for at least 40 rows of our own design beyond its examples (about 15 of these rows are its
    examples or close variants; the rest are new)."""
    assert len(ROWS) >= 60 and len({r.id for r in ROWS}) == len(ROWS)
