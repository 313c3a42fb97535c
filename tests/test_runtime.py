"""The runtime on the CPU: NMS, artifact/backend choice, the onnxruntime Detector against ``python -m train.evaluate``'s
prediction path, the TensorRT sidecar checks (host side; TensorRT itself is not installable here), zones, sources,
and ``python -m deploy`` end to end on the shared clip (two streams, a zone, outputs re-read) plus its bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import batched_nms

from sidnet.runtime.artifact import backend_for
from sidnet.runtime.detector import Detector
from sidnet.runtime.errors import DeployError
from sidnet.runtime.nms import Detections, nms
from tests.conftest import video_frames

ROOT = Path(__file__).resolve().parents[1]
CONF = 0.01  # the tiny untrained model scores ~0.02: this keeps a few dozen boxes per image


def test_nms_equals_torchvision_batched_nms():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(0, 60))
        xy = rng.uniform(0, 100, (n, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (n, 2)).astype(np.float32)], 1)
        scores = rng.random(n).astype(np.float32)
        classes = rng.integers(0, 3, n)
        ref = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes), 0.45)
        np.testing.assert_array_equal(nms(boxes, scores, classes, iou=0.45), ref.numpy(), err_msg=f"trial {trial}")


def test_backend_follows_the_artifact(tiny_onnx, tmp_path):
    assert backend_for(tiny_onnx) == "onnxruntime"
    assert backend_for(tiny_onnx, "torch") == "torch"  # an INT8 Q/DQ export runs on the torch backend's INT8 kernels
    with pytest.raises(DeployError, match="runs on backend onnxruntime, not compiled"):
        backend_for(tiny_onnx, "compiled")
    with pytest.raises(DeployError, match="no QuantizeLinear nodes: it is not an INT8 Q/DQ export"):
        Detector(tiny_onnx, backend="torch", device="cpu")
    (tmp_path / "m.bin").write_bytes(b"x")
    with pytest.raises(DeployError, match="unknown suffix"):
        backend_for(tmp_path / "m.bin")
    with pytest.raises(DeployError, match="artifact not found"):
        backend_for(tmp_path / "missing.onnx")
    with pytest.raises(DeployError, match="below"):
        Detector(tiny_onnx, conf_thresh=0.0001)


def test_onnxruntime_detector_matches_the_evaluate_prediction_path(tiny_checkpoint, tiny_onnx, shared_data):
    """Same images, same checkpoint: ``predict_dataset`` (what ``python -m train.evaluate`` runs, PyTorch) and the
    Detector over the exported ONNX give the same detections in original-image pixels."""
    from sidnet.checkpoint import load_checkpoint, model_from_checkpoint
    from sidnet.data import DetectionDataset, ImageRecord
    from sidnet.engine.tasks import build_task
    from sidnet.evaluation.predict import predict_dataset

    paths = sorted((shared_data / "coco128" / "images" / "val2017").glob("*.jpg"))[:6]
    records = []
    for i, p in enumerate(paths):
        w, h = Image.open(p).size
        records.append(ImageRecord(path=p, width=w, height=h, boxes=np.zeros((0, 4), np.float32),
                                   labels=np.zeros(0, np.int64), image_id=i))  # fmt: skip
    model = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
    ref, _ = predict_dataset(model, DetectionDataset(records, size=128), task=build_task(model),
                             device=torch.device("cpu"), batch_size=4, conf_thresh=CONF)  # fmt: skip
    det = Detector(tiny_onnx, conf_thresh=CONF)
    frames = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]
    got = det(frames)
    for i, d in enumerate(got):
        assert len(d) == len(ref[i]) > 0
        np.testing.assert_allclose(d.as_array(), ref[i], atol=0.05, rtol=1e-4)


def test_torch_backend_on_cpu_matches_onnxruntime(tiny_checkpoint, tiny_onnx, shared_data):
    frames = video_frames(shared_data, 3)
    a = Detector(tiny_checkpoint, conf_thresh=CONF, device="cpu")
    assert a.backend_name == "torch" and not a.gpu_preprocess
    for x, y in zip(a(frames), Detector(tiny_onnx, conf_thresh=CONF)(frames), strict=True):
        assert len(x) == len(y) > 0
        np.testing.assert_allclose(x.as_array(), y.as_array(), atol=0.05, rtol=1e-4)


# --------------------------------------------------------------------------------------------- TensorRT (host)


def _sidecar(engine: Path, **over) -> dict:
    from sidnet.io import sha256_file as _sha256

    side = {"backend": "tensorrt", "backend_version": "10.13.0.35", "compute_capability": "9.0", "gpu": "H100",
            "precision": "fp16", "engine_sha256": _sha256(engine), "plugins": None}  # fmt: skip
    side.update(over)
    return side


@pytest.fixture
def engine_file(tmp_path) -> Path:
    path = tmp_path / "model.engine"
    path.write_bytes(np.random.default_rng(0).bytes(256))
    return path


def test_tensorrt_sidecar_checks_run_before_deserialising(engine_file, tmp_path):
    from sidnet.runtime.backends.tensorrt import check_sidecar

    def check(side, **kw):
        args = {"engine": engine_file, "runtime": "tensorrt", "runtime_version": "10.13.0.35",
                "compute_capability": "9.0", **kw}  # fmt: skip
        return check_sidecar(side, **args)

    assert check(_sidecar(engine_file)) is None
    cases = [
        (_sidecar(engine_file, backend="tensorrt-rtx"), {}, "built by tensorrt-rtx"),
        (_sidecar(engine_file), {"runtime_version": "10.12.0"}, "only load in the version"),
        (_sidecar(engine_file), {"compute_capability": "8.6"}, "compute capability 9.0"),
        (_sidecar(engine_file), {"compute_capability": None}, "no CUDA GPU"),
        (_sidecar(engine_file, engine_sha256="0" * 64), {}, "does not match its sidecar"),
        (_sidecar(engine_file, precision="int4"), {}, "precision 'int4'"),
        (_sidecar(engine_file, precision="int8"), {}, "no `int8` manifest"),
        (_sidecar(engine_file, plugins={"library": str(tmp_path / "nope.so"), "sha256": "x"}), {}, "is missing"),
    ]
    for side, kw, msg in cases:
        with pytest.raises(DeployError, match=msg):
            check(side, **kw)
    assert check(_sidecar(engine_file, precision="int8", int8={"calibration": "entropy, 512 images"})) is None
    lib = tmp_path / "libsidnet_kernels.so"
    lib.write_bytes(b"built library")
    with pytest.raises(DeployError, match="different libsidnet_kernels.so"):
        check(_sidecar(engine_file, plugins={"library": str(lib), "sha256": "0" * 64}))
    from sidnet.io import sha256_file as _sha256

    ok = check(_sidecar(engine_file, plugins={"library": "/elsewhere/lib.so", "sha256": _sha256(lib)}),
               plugin_library=lib)  # fmt: skip
    assert ok == {"library": str(lib)}


def test_tensorrt_binding_plan():
    from sidnet.runtime.backends.tensorrt import plan_bindings

    plan = plan_bindings([("images", True, "FLOAT", (-1, 3, 416, 416)), ("detections", False, "FLOAT", (-1, 100, 6)),
                          ("num_detections", False, "INT32", (-1,))], max_batch=32)  # fmt: skip
    assert [(b.name, b.shape, b.nbytes) for b in plan] == [
        ("images", (32, 3, 416, 416), 32 * 3 * 416 * 416 * 4), ("detections", (32, 100, 6), 32 * 600 * 4),
        ("num_detections", (32,), 128)]  # fmt: skip
    with pytest.raises(DeployError, match="only the batch axis"):
        plan_bindings([("images", True, "FLOAT", (-1, 3, -1, 416))], max_batch=4)
    with pytest.raises(DeployError, match="not the exported contract"):
        plan_bindings([("input", True, "FLOAT", (-1, 3, 4, 4))], max_batch=4)


def test_tensorrt_and_onnxruntime_paths_do_not_import_torch(tiny_onnx, engine_file, shared_data):
    code = f"""
import json, sys
from pathlib import Path
from sidnet.runtime.detector import Detector
from sidnet.runtime.backends.tensorrt import check_sidecar, TensorRTBackend
from tests.conftest import video_frames
det = Detector({str(tiny_onnx)!r}, conf_thresh=0.01)
assert len(det(video_frames(Path({str(shared_data)!r}), 2))) == 2
assert 'torch' not in sys.modules, 'torch was imported'
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --------------------------------------------------------------------------------------------- zones, sources


def test_batched_finalize_equals_per_image_nms():
    """The pipeline's one-call-per-batch post-process keeps exactly the boxes the per-image NMS keeps (random boxes,
    unsorted and tied scores, three classes, max_det cuts, letterbox maps)."""
    from sidnet.letterbox import LetterboxInfo, unletterbox_boxes
    from sidnet.runtime.nms import finalize

    rng = np.random.default_rng(0)
    for trial in range(40):
        n, k = int(rng.integers(1, 7)), int(rng.integers(1, 30))
        xy = rng.uniform(0, 400, (n, k, 2))
        scores = rng.uniform(0, 1, (n, k)) if trial % 2 else np.round(rng.uniform(0, 1, (n, k)), 1)
        dets = np.concatenate([xy, xy + rng.uniform(1, 120, (n, k, 2)), scores[..., None],
                               rng.integers(0, 3, (n, k, 1))], -1).astype(np.float32)  # fmt: skip
        num = rng.integers(0, k + 1, n)
        infos = [LetterboxInfo(scale=float(rng.uniform(0.3, 2)), pad_x=int(rng.integers(0, 50)),
                               pad_y=int(rng.integers(0, 50)), orig_h=576, orig_w=768) for _ in range(n)]  # fmt: skip
        conf, max_det = float(rng.uniform(0, 0.5)), int(rng.integers(1, 20))
        got = finalize(dets, num, infos, conf_thresh=conf, nms_iou=0.45, max_det=max_det)
        for d, nn, info, g in zip(dets, num, infos, got, strict=True):
            d = d[:nn][d[:nn, 4] >= conf]
            d = d[nms(d[:, :4], d[:, 4], d[:, 5], iou=0.45)[:max_det]]
            np.testing.assert_array_equal(g.scores, d[:, 4], err_msg=f"trial {trial}")
            np.testing.assert_array_equal(g.classes, d[:, 5].astype(np.int64))
            np.testing.assert_array_equal(g.boxes, unletterbox_boxes(d[:, :4], info) if len(d) else g.boxes)


def test_zone_polygons_match_opencv():
    """Vectorised point-in-polygon (zones of a whole batch at once) == cv2.pointPolygonTest >= 0, edges and vertices
    included, on convex, concave and self-crossing polygons."""
    from sidnet.runtime.zones import points_in_polygon

    rng = np.random.default_rng(1)
    for trial in range(100):
        poly = rng.integers(0, 50, (int(rng.integers(3, 8)), 2)).astype(np.float32)
        pts = np.concatenate([rng.uniform(-5, 55, (60, 2)), rng.integers(0, 50, (60, 2)), poly,
                              (poly + np.roll(poly, -1, 0)) / 2])  # fmt: skip
        ref = [cv2.pointPolygonTest(poly.reshape(-1, 1, 2), (float(x), float(y)), False) >= 0 for x, y in pts]
        np.testing.assert_array_equal(points_in_polygon(pts, poly), ref, err_msg=f"trial {trial}")
    assert points_in_polygon(np.zeros((0, 2)), poly).shape == (0,)


def test_zone_debounce_cooldown_and_counts(tmp_path):
    from sidnet.runtime.zones import check_zones_fit, load_zones, update_zones

    path = tmp_path / "zones.yaml"
    path.write_text("debounce_frames: 2\ncooldown_s: 1.0\nstreams:\n  cam:\n    - name: door\n"
                    "      polygon: [[0, 0], [100, 0], [100, 100], [0, 100]]\n")  # fmt: skip
    cfg = load_zones(path, streams=["cam"])
    zones = cfg.streams["cam"]
    inside = Detections(np.array([[10, 10, 30, 50], [40, 40, 60, 90]], np.float32), np.array([0.9, 0.8]),
                        np.array([0, 0]))  # fmt: skip
    outside = Detections(np.array([[10, 150, 30, 190]], np.float32), np.array([0.9]), np.array([0]))
    seq = [inside, inside, inside, outside, inside, inside, inside, inside, inside, inside, inside, inside]
    alarms, counts = [], []
    for i, d in enumerate(seq):  # 10 frames per second
        c, ev = update_zones(zones, d, time=i / 10, frame=i, stream="cam", cfg=cfg, class_names=["person"])
        counts.append(c["door"])
        alarms += [e["frame"] for e in ev]
    assert counts[:4] == [2, 2, 2, 0]
    assert alarms == [1, 11]  # debounce: 2nd consecutive frame; frame 5 would re-arm but 1.0 s cooldown holds
    assert zones[0].alarms == 2
    with pytest.raises(DeployError, match="outside the 80x80 frame"):
        check_zones_fit(zones, stream="cam", width=80, height=80)
    with pytest.raises(DeployError, match="not a source of this run"):
        load_zones(path, streams=["other"])


def test_live_source_reconnects_after_the_stream_drops(shared_data):
    from sidnet.runtime.sources import LiveSource

    events = []
    video = str(shared_data / "video" / "pedestrians_200.mp4")  # a "camera" that drops after 200 frames
    src = LiveSource("cam", video, backoff=(0.01, 0.05), max_retries=3, max_frames=210, on_event=events.append)
    n = 0
    while src.read() is not None:
        n += 1
    assert n == 210
    assert [e["type"] for e in events] == ["stream_lost", "reconnect"] and events[1]["ok"]
    # A stream that never delivered a frame is not retried: a wrong URL fails at once, with one line.
    dead = LiveSource("dead", "rtsp://127.0.0.1:1/none", backoff=(0.01, 0.02), max_retries=2, on_event=events.append)
    with pytest.raises(DeployError, match=r"stream dead \(rtsp://127.0.0.1:1/none\) could not be opened and never"):
        dead.read()
    assert events[2:] == []


# --------------------------------------------------------------------------------------------- python -m deploy


ZONES = """debounce_frames: 2
cooldown_s: 0.3
streams:
  a:
    - name: all
      polygon: [[0, 0], [767, 0], [767, 575], [0, 575]]
"""


def _deploy(*args: str) -> dict:
    from deploy.__main__ import main

    return main([*map(str, args), "--no-progress"])


def test_deploy_two_streams_with_a_zone_end_to_end(tiny_onnx, shared_data, tmp_path):
    video = shared_data / "video" / "pedestrians_200.mp4"
    (tmp_path / "zones.yaml").write_text(ZONES)
    out = tmp_path / "out"
    summary = _deploy(tiny_onnx, f"a={video}", f"b={video}", "--zones", tmp_path / "zones.yaml", "--out", out,
                      "--max-frames", 6, "--batch", 4, "--conf", CONF)  # fmt: skip
    assert summary["frames"] == {"a": 6, "b": 6}
    # outputs re-read: JSON-lines per frame, video with 6 frames, events = alarms counted in the summary
    lines = [json.loads(x) for x in (out / "a.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in lines] == list(range(6)) and all("all" in r["zones"] for r in lines)
    cap = cv2.VideoCapture(str(out / "b.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 6 and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 768
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    alarms = [e for e in events if e["type"] == "alarm"]
    assert len(alarms) == summary["alarms"]["a"]["all"] >= 2 and alarms[0]["frame"] == 1
    assert json.loads((out / "summary.json").read_text())["frames"] == {"a": 6, "b": 6}
    # detections written equal the Detector's on the same frames
    direct = Detector(tiny_onnx, conf_thresh=CONF)(video_frames(shared_data, 6))
    for rec, d in zip(lines, direct, strict=True):
        assert (
            len(rec["detections"])
            == len(d)
            == rec["zones"]["all"] + sum(1 for b in d.boxes if not (0 <= (b[0] + b[2]) / 2 <= 767 and 0 <= b[3] <= 575))
        )
        np.testing.assert_allclose([x["box"] for x in rec["detections"]], d.boxes, atol=0.01)
    with pytest.raises(SystemExit, match="already exists: pass --force"):
        _deploy(tiny_onnx, f"a={video}", "--out", out, "--max-frames", 1)


def test_deploy_bad_inputs_are_one_line_errors(tiny_onnx, tiny_checkpoint, shared_data, tmp_path):
    video = shared_data / "video" / "pedestrians_200.mp4"
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(500))
    (tmp_path / "empty").mkdir()
    (tmp_path / "far.yaml").write_text(ZONES.replace("[767, 575]", "[900, 575]"))
    out = tmp_path / "o"
    cases = [
        ([tiny_onnx, broken], "cannot read video"),
        ([tiny_onnx, tmp_path / "empty"], "has no images"),
        ([tiny_onnx, video, "--backend", "torch"], "it is not an INT8 Q/DQ export"),
        ([tiny_checkpoint, video, "--backend", "tensorrt"], "runs on backend torch, not tensorrt"),
        ([tiny_onnx, f"a={video}", "--zones", tmp_path / "far.yaml"], "outside the 768x576 frame"),
        ([tiny_onnx, video, "--zones", tmp_path / "far.yaml"], "not a source of this run"),
        ([tmp_path / "none.onnx", video], "artifact not found"),
        ([tiny_onnx, f"a={video}", "--video-streams", "b"], "--video-streams names ['b']"),
        ([tiny_onnx, f"a={video}", "--realtime", "--fps", "0"], "--fps 0.0 must be > 0"),
        ([tiny_onnx, f"a={video}", "--queue", "0"], "--queue 0 must be >= 1"),
    ]
    for args, msg in cases:
        with pytest.raises(SystemExit) as exc:
            _deploy(*args, "--out", out)
        err = str(exc.value.code)  # sidnet.cli.run_guarded: SystemExit("error: ..."), printed by Python, status 1
        assert err.startswith("error: ") and "\n" not in err and msg in err, (msg, err)
    assert not (out / "summary.json").exists()
    # the real command line: one line on stderr, no traceback
    r = subprocess.run([sys.executable, "-m", "deploy", str(tiny_onnx), str(broken), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: cannot read video")


@pytest.mark.slow
def test_export_compiled_on_cpu_runs_in_the_detector(tiny_checkpoint, tiny_onnx, shared_data, tmp_path):
    """``python -m export --backend compiled`` (AOTInductor, CPU here: ~90 s of C++ compilation) → ``.pt2`` + sidecar
    → Detector; same detections as the ONNX."""
    r = subprocess.run([sys.executable, "-m", "export", "--checkpoint", str(tiny_checkpoint), "--backend", "compiled",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    side = json.loads((tmp_path / "model.pt2.json").read_text())
    assert side["backend"] == "compiled" and side["device"] == "cpu" and side["torch"] == torch.__version__
    frames = video_frames(shared_data, 3)
    comp = Detector(tmp_path / "model.pt2", conf_thresh=CONF)
    for x, y in zip(comp(frames), Detector(tiny_onnx, conf_thresh=CONF)(frames), strict=True):
        assert len(x) == len(y) > 0
        np.testing.assert_allclose(x.as_array(), y.as_array(), atol=0.05, rtol=1e-3)
    side["torch"] = "0.0.1"
    (tmp_path / "model.pt2.json").write_text(json.dumps(side))
    with pytest.raises(DeployError, match="only load in the release that built them"):
        Detector(tmp_path / "model.pt2")


def test_pool_module_keeps_the_numbers():
    """fuse_for_inference(kernel_pool=True) swaps every MaxPool2d(2, 2) for MaxPool2x2 (the csrc kernel on
    channels-last CUDA tensors, max_pool2d elsewhere): checked on the CPU in FP32 with BatchNorm folded too."""
    from torch import nn

    from sidnet.models import build_model
    from sidnet.models.fuse import MaxPool2x2, fuse_for_inference

    torch.manual_seed(0)
    model = build_model("sidnet", anchors=[[10, 20], [30, 60], [90, 120]], num_classes=1, input_size=128,
                        width=0.25).eval()  # fmt: skip
    for m in model.modules():  # non-trivial BatchNorm statistics, so folding is exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    net = fuse_for_inference(model, kernel_pool=True)
    assert sum(isinstance(m, MaxPool2x2) for m in net.modules()) == sum(
        isinstance(m, nn.MaxPool2d) for m in model.modules()) > 0  # fmt: skip
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["sidnet", "yolov2", "sidnet_mobilenetv2"])
def test_stem_module_placement_and_numbers_on_cpu(name):
    """fuse_for_inference(kernel_stem=True) replaces exactly Darknet-19's first conv + pool (ReLU for SIDNet, LeakyReLU
    for YOLOv2) and nothing in a MobileNetV2 trunk (stride-2 first conv); on the CPU the module runs conv then pool, so
    the numbers equal the unfused network's."""
    from torch import nn

    from sidnet.models import build_model
    from sidnet.models.fuse import ConvBiasAct, StemConvActPool, fuse_for_inference

    torch.manual_seed(0)
    kw = {"anchors": [[10, 20], [30, 60], [90, 120]], "num_classes": 1} if name.startswith("sidnet") else {}
    if name != "sidnet_mobilenetv2":
        kw["width"] = 0.25
    model = build_model(name, input_size=128, **kw).eval()
    net = fuse_for_inference(model, kernel_stem=True, kernel_pool=True)
    stems = [m for m in net.modules() if isinstance(m, StemConvActPool)]
    assert len(stems) == (0 if name == "sidnet_mobilenetv2" else 1)
    if stems:
        assert stems[0].act == ("relu" if name == "sidnet" else "leaky_relu")
        assert isinstance(net.backbone.stage16[1], nn.Identity)
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), rtol=1e-4, atol=1e-4)
    # what the kernel cannot take stays unfused: 4 input channels, 12 outputs, stride 2, a 3x3/2 pool
    assert not StemConvActPool.fits(ConvBiasAct(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU()), nn.MaxPool2d(2, 2))
    assert not StemConvActPool.fits(ConvBiasAct(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU()), nn.MaxPool2d(2, 2))
    assert not StemConvActPool.fits(ConvBiasAct(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU()), nn.MaxPool2d(2, 2))
    assert not StemConvActPool.fits(ConvBiasAct(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()), nn.MaxPool2d(3, 2))
    assert StemConvActPool.fits(ConvBiasAct(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()), nn.MaxPool2d(2, 2))


# ------------------------------------------------------------------ the pipeline against main's (golden outputs)
GOLDEN = ROOT / "tests" / "fixtures" / "pipeline_golden.json"


def _read_run(out: Path) -> tuple[dict, list[dict]]:
    streams = {s: [json.loads(x) for x in (out / f"{s}.jsonl").read_text().splitlines()] for s in ("a", "b")}
    events = sorted(({k: v for k, v in json.loads(x).items() if k != "wall_time"}
                     for x in (out / "events.jsonl").read_text().splitlines()),
                    key=lambda e: (e["stream"], e["frame"], e["zone"]))  # fmt: skip
    return streams, events


def _same_records(got: list[dict], want: list[dict], *, box_atol: float) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert {k: v for k, v in g.items() if k != "detections"} == {k: v for k, v in w.items() if k != "detections"}
        assert len(g["detections"]) == len(w["detections"]), g["frame"]
        for a, b in zip(g["detections"], w["detections"], strict=True):
            np.testing.assert_allclose(a["box"], b["box"], atol=box_atol)
            assert abs(a["score"] - b["score"]) <= 1e-3 and a["class"] == b["class"]


@pytest.mark.parametrize("decode,writers", [("process", 1), ("thread", 0)])
def test_pipeline_matches_mains_outputs_on_the_clip(tiny_onnx, shared_data, tmp_path, decode, writers):
    """The new pipeline (decode processes + shared-memory rings, batched NMS and zones, writer process) and its
    thread path give the detections, zone counts and alarms that main's threaded pipeline wrote for the same run
    (tests/fixtures/pipeline_golden.json, recorded from main 663ce8b with the tiny ONNX of tests/conftest.py)."""
    golden = json.loads(GOLDEN.read_text())
    video = shared_data / "video"
    (tmp_path / "zones.yaml").write_text(golden["zones"])
    out = tmp_path / "out"
    summary = _deploy(tiny_onnx, f"a={video / 'pedestrians_200.mp4'}", f"b={video / 'pedestrians_200_h264.mp4'}",
                      "--zones", tmp_path / "zones.yaml", "--out", out, "--max-frames", 60, "--batch", 4, "--conf",
                      0.02, "--decode", decode, "--writers", writers,
                      *(["--video-streams", "b"] if decode == "thread" else ["--no-video"]))  # fmt: skip
    streams, events = _read_run(out)
    for s in ("a", "b"):
        _same_records(streams[s], golden["streams"][s], box_atol=0.02)
    want = sorted(golden["events"], key=lambda e: (e["stream"], e["frame"], e["zone"]))
    assert [{k: v for k, v in e.items() if k != "boxes"} for e in events] == [
        {k: v for k, v in e.items() if k != "boxes"} for e in want
    ]
    assert summary["alarms"] == golden["alarms"] and summary["decode"] == {"a": decode, "b": decode}
    assert (out / "b.mp4").exists() == (decode == "thread") and not (out / "a.mp4").exists()
    assert summary["all_streams_kept_up"] and summary["latency_ms"]["p50"] > 0
    assert set(summary["stages_s"]) >= {"gather", "preprocess", "inference", "postprocess", "zones", "output"}


def test_realtime_pacing_counts_dropped_frames(tiny_onnx, shared_data, tmp_path):
    """--realtime at 400 frames/s per stream is more than this CPU runs: frames are dropped, counted per stream, and
    every frame is either written or counted; none is both."""
    video = shared_data / "video" / "pedestrians_200.mp4"
    out = tmp_path / "rt"
    summary = _deploy(tiny_onnx, f"a={video}", f"b={video}", "--out", out, "--max-frames", 40, "--batch", 2,
                      "--realtime", "--fps", 400, "--queue", 2, "--no-video")  # fmt: skip
    assert summary["realtime"] and not summary["all_streams_kept_up"]
    for s in ("a", "b"):
        d = summary["drops"][s]
        assert summary["frames"][s] + d["pipeline_behind"] + d["decoder_behind"] == 40, (s, summary)
        written = [json.loads(x)["frame"] for x in (out / f"{s}.jsonl").read_text().splitlines()]
        assert written == sorted(written) and len(set(written)) == len(written) == summary["frames"][s]
    assert sum(d["pipeline_behind"] + d["decoder_behind"] for d in summary["drops"].values()) > 0


def test_make_clip_encodes_h264_at_the_asked_size(shared_data, tmp_path):
    """The e2e benchmark's clip maker (PyAV/libx264, the `video` extra): every frame, the size and codec asked."""
    pytest.importorskip("av", reason="PyAV not installed (pip install -e .[video])")
    from sidnet.runtime.bench_pipeline import make_clip

    out = make_clip(shared_data / "video" / "pedestrians_200.mp4", tmp_path / "small.mp4", width=96, height=72)
    cap = cv2.VideoCapture(str(out))
    n, w, h = (int(cap.get(p)) for p in (cv2.CAP_PROP_FRAME_COUNT, cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT))
    fourcc = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode()
    cap.release()
    assert (n, w, h) == (200, 96, 72) and fourcc in ("avc1", "h264", "H264")
    assert not (tmp_path / "small.part.mp4").exists()


def test_triton_client_path_imports_without_torch_or_pycocotools():
    """``python -m deploy triton://...`` runs in the serving venv (no torch, pycocotools, albumentations): the modules
    of that path must import without them (a top-level import of sidnet.data once broke it)."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision', 'pycocotools', 'albumentations', 'hydra'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import deploy.__main__, sidnet.runtime.pipeline, sidnet.runtime.writer, sidnet.runtime.detector\n"
        "import sidnet.runtime.backends.triton\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
