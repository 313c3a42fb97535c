"""Triton Inference Server, for real: the export's model repository checked with Triton's own model-config protobuf,
and ``python -m deploy.serve`` serving the tiny model from a ``tritonserver`` process on localhost.

pytriton (``nvidia-pytriton``, which ships ``tritonserver`` and its Python backend) needs numpy<2 and the system
interpreter (see ``deploy/serve.py``), so these tests use their own venv: ``$SIDNET_SERVE_VENV``, else
``.venv-serve`` in the repository, created on first use with ``python -m deploy.serve --make-env`` (about 2 minutes on
an idle 2-core machine, 4.5 with other work on it; later runs reuse it). Only a machine without ``/usr/bin/python3.11``
skips them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest

from deploy.serve import DEFAULT_PYTHON

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "sidnet" / "sample" / "images" / "val2017"
CONF = 0.01  # the tiny untrained model scores ~0.02 (as in test_runtime.py)
PROBE = ("import pytriton, tritonclient.http, tritonclient.grpc.model_config_pb2, onnx, onnxruntime, cv2, PIL, yaml, "
         "tqdm")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def serve_python() -> Path:
    folder = Path(os.environ.get("SIDNET_SERVE_VENV", ROOT / ".venv-serve"))
    exe = folder / "bin" / "python"
    if exe.is_file() and subprocess.run([exe, "-c", PROBE], capture_output=True).returncode == 0:
        return exe
    if not Path(DEFAULT_PYTHON).is_file():
        pytest.skip(f"{DEFAULT_PYTHON} (the interpreter pytriton's stub needs) is not on this machine")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "deploy.serve", "--make-env", str(folder)], cwd=ROOT,
                       capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    print(f"made {folder} in {time.perf_counter() - t0:.0f} s")
    assert subprocess.run([exe, "-c", PROBE], capture_output=True).returncode == 0
    return exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_triton_repository_config_matches_the_onnx(tiny_checkpoint, serve_python, tmp_path):
    from sidnet.export.config import ExportConfig
    from sidnet.export.pipeline import run_export

    cfg = ExportConfig(checkpoint=str(tiny_checkpoint), out=str(tmp_path), backend="triton")
    cfg.batch.opt, cfg.batch.max = 8, 32
    cfg.triton.instances, cfg.triton.kind = 2, "cpu"
    result = run_export(cfg, project_root=ROOT)
    name = result.report["model"]["name"]
    config = tmp_path / name / "config.pbtxt"
    assert (tmp_path / name / "1" / "model.onnx").read_bytes() == result.onnx_path.read_bytes()

    # Parsed by Triton's own schema (inference.ModelConfig), in the serving environment that has tritonclient.
    parse = ("import sys, json; from google.protobuf import text_format, json_format; "
             "from tritonclient.grpc import model_config_pb2 as pb; "
             "m = text_format.Parse(open(sys.argv[1]).read(), pb.ModelConfig()); "
             "print(json.dumps(json_format.MessageToDict(m, preserving_proto_field_name=True)))")  # fmt: skip
    r = subprocess.run([serve_python, "-c", parse, config], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    parsed = json.loads(r.stdout)
    assert parsed["name"] == name and parsed["platform"] == "onnxruntime_onnx"
    assert parsed["max_batch_size"] == 32
    assert parsed["dynamic_batching"]["preferred_batch_size"] == [8, 32]
    assert parsed["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]

    graph = onnx.load(str(result.onnx_path)).graph
    types = {1: "TYPE_FP32", 6: "TYPE_INT32", 10: "TYPE_FP16"}
    for section, values in (("input", graph.input), ("output", graph.output)):
        assert [t["name"] for t in parsed[section]] == [v.name for v in values]
        for t, v in zip(parsed[section], values, strict=True):
            shape = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            assert shape[0] is None  # the dynamic batch, which max_batch_size stands for
            assert t["data_type"] == types[v.type.tensor_type.elem_type]
            if shape[1:]:
                assert [int(d) for d in t["dims"]] == shape[1:]
            else:  # num_detections [N]: one element per request, reshaped away
                assert [int(d) for d in t["dims"]] == [1] and t["reshape"].get("shape", []) == []
    meta = {p.key: p.value for p in onnx.load(str(result.onnx_path)).metadata_props}
    info = json.loads(parsed["parameters"]["sidnet_info"]["string_value"])
    assert info["input_size"] == int(meta["input_size"]) and info["anchors"] == json.loads(meta["anchors"])
    assert info["conf_thresh"] == float(meta["conf_thresh"]) and info["class_names"] == json.loads(meta["class_names"])
    assert parsed["parameters"]["precision"]["string_value"] == "fp32" == meta["precision"]
    assert result.report["triton"]["batch"] == [1, 8, 32]


def test_triton_server_answers_like_the_in_process_detector(tiny_onnx, serve_python, tmp_path):
    """A real tritonserver on localhost: the server's detections equal the in-process Detector's (in the serving
    venv and in this one), a bounded load test drops nothing, and ``python -m deploy triton://...`` runs the
    pipeline through it."""
    from sidnet.runtime.detector import Detector
    from sidnet.runtime.sources import ImageFolderSource

    ports = [_free_port() for _ in range(3)]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115  (closed in finally)
    t0 = time.perf_counter()
    server = subprocess.Popen([serve_python, "-m", "deploy.serve", str(tiny_onnx), "--name", "tiny", "--http-port",
                               str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
                               "--max-batch", "8"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"triton://localhost:{ports[0]}/tiny"
    try:
        ready = f"http://localhost:{ports[0]}/v2/models/tiny/ready"
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.perf_counter() - t0 < 300, "tritonserver not ready after 300 s"
            try:
                if urllib.request.urlopen(ready, timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        print(f"tritonserver ready in {time.perf_counter() - t0:.1f} s")
        r = subprocess.run([serve_python, "-m", "deploy.serve", "--load-test", url, "--compare", str(tiny_onnx),
                            "--images", str(IMAGES), "--clients", "4", "--requests", "40", "--conf", str(CONF),
                            "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        result = json.loads(r.stdout)
        load = result["triton"]
        assert load["answered"] == 40 and load["dropped"] == 0, load["failures"]
        assert load["img_per_s"] > 0 and 0 < load["p50_ms"] <= load["p99_ms"]
        cmp = result["compare"]
        assert cmp["counts_equal"] and cmp["detections"] > 0 and cmp["max_abs_diff"] <= 1e-4, cmp["max_abs_diff"]
        print({k: result[k] for k in ("triton", "in_process")})

        # The server's detections against this environment's in-process Detector (numpy 2, the test's onnxruntime).
        src = ImageFolderSource("images", IMAGES)
        frames = [f.image for f in iter(src.read, None)][: cmp["frames"]]
        src.close()
        with Detector(tiny_onnx, conf_thresh=CONF) as det:
            here = det(frames)
        for served, local in zip(cmp["server"], here, strict=True):
            np.testing.assert_allclose(np.asarray(served, np.float32).reshape(-1, 6), local.as_array(), atol=1e-4)

        # Client mode of the pipeline: python -m deploy triton://... (in the serving venv, which has tritonclient).
        out = tmp_path / "deploy"
        d = subprocess.run([serve_python, "-m", "deploy", url, f"cam0={IMAGES}", "--out", str(out), "--conf",
                            str(CONF), "--no-video"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
        assert d.returncode == 0, d.stderr[-2000:]
        rows = [json.loads(line) for line in (out / "cam0.jsonl").read_text().splitlines()]
        assert len(rows) == len(frames) and [len(row["detections"]) for row in rows] == [len(x) for x in here]
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        finally:
            log.close()
