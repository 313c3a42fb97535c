"""The GPU backends (``-m gpu``, run by benchmarks/run_gpu.sh on the GPU machine): GPU letterbox vs OpenCV's, the
torch backend (CUDA graphs, fused csrc tail, FP32 and FP16) and the compiled backend (AOTInductor on CUDA) against
onnxruntime on the CPU, and the TensorRT backend's pycuda path up to the (absent) TensorRT import."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from sidnet.letterbox import letterbox
from sidnet.runtime.detector import Detector
from tests.conftest import video_frames

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def need_gpu():
    if not torch.cuda.is_available():
        if os.environ.get("SIDNET_REQUIRE_GPU") == "1":
            pytest.fail("SIDNET_REQUIRE_GPU=1 but torch.cuda.is_available() is False")
        pytest.skip("needs CUDA; run benchmarks/run_gpu.sh on the GPU machine")


def _cpu_batch(frames, size):
    out = [letterbox(f, np.zeros((0, 4)), size=size) for f in frames]
    return np.stack([o[0].transpose(2, 0, 1) for o in out]).astype(np.float32) / 255.0, [o[2] for o in out]


def test_gpu_letterbox_matches_opencv(shared_data):
    from sidnet.runtime.backends.torch import GpuLetterbox

    rng = np.random.default_rng(0)
    frames = video_frames(shared_data, 2) + [rng.integers(0, 256, (300, 170, 3), dtype=np.uint8)]
    ref, ref_infos = _cpu_batch(frames, 416)
    lb = GpuLetterbox(416, torch.device("cuda"))
    out = torch.full((3, 3, 416, 416), float("nan"), device="cuda")
    infos = lb(lb.upload(frames), out)
    got = out.cpu().numpy()
    assert infos == ref_infos
    assert np.isfinite(got).all()
    diff = np.abs(got - ref)
    assert diff.mean() < 0.5 / 255 and diff.max() <= 3 / 255, (diff.mean() * 255, diff.max() * 255)


@pytest.mark.parametrize("precision,tol", [("fp32", 2e-3), ("fp16", 2e-2)])
def test_torch_backend_matches_onnxruntime(tiny_checkpoint, tiny_onnx, shared_data, precision, tol):
    from sidnet.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from sidnet.runtime.backends.torch import open_backend

    images, _ = _cpu_batch(video_frames(shared_data, 3), 128)
    ort_dets, ort_num = OnnxRuntimeBackend(tiny_onnx).infer(images)
    be = open_backend(tiny_checkpoint, device="cuda", precision=precision, conf_thresh=0.001, use_kernel=True)
    assert be.graphs and "csrc" in be.decode
    for _ in range(2):  # first call captures the graph, second replays it
        dets, num = be.infer(images)
    assert (np.abs(num.astype(int) - ort_num.astype(int)) <= 1).all()
    _assert_same_rows(dets, num, ort_dets, ort_num, score_tol=tol, box_tol=2.0)


def _assert_same_rows(a, an, b, bn, *, score_tol, box_tol):
    """Every row of ``b`` scoring clear of the threshold has a row in ``a`` with the same box and score (as sets:
    near-equal scores may come in another order)."""
    for i in range(len(a)):
        rows_a, rows_b = a[i, : int(an[i])], b[i, : int(bn[i])]
        assert len(rows_b) > 0
        for row in rows_b[: int(min(an[i], bn[i])) - 1]:
            box_err = np.abs(rows_a[:, :4] - row[:4]).max(1) / box_tol
            err = np.maximum(box_err, np.abs(rows_a[:, 4] - row[4]) / score_tol)
            assert err.min() <= 1.0, (row, rows_a[err.argmin()])


def test_detector_on_gpu_matches_cpu_onnxruntime(tiny_checkpoint, tiny_onnx, shared_data):
    frames = video_frames(shared_data, 4)
    gpu = Detector(tiny_checkpoint, conf_thresh=0.01, device="cuda", precision="fp32")
    assert gpu.gpu_preprocess
    cpu = Detector(tiny_onnx, conf_thresh=0.01)
    matched = total = 0
    for a, b in zip(gpu(frames), cpu(frames), strict=True):
        total += len(b)
        for box in b.boxes:  # each CPU box has a GPU box at IoU > 0.9 (GPU letterbox differs by ~1/255)
            lt = np.maximum(a.boxes[:, :2], box[:2])
            rb = np.minimum(a.boxes[:, 2:], box[2:])
            inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
            union = np.prod(a.boxes[:, 2:] - a.boxes[:, :2], axis=1) + np.prod(box[2:] - box[:2]) - inter
            matched += bool(len(a) and (inter / union).max() > 0.9)
    assert total > 0 and matched >= 0.9 * total, (matched, total)


def test_compiled_backend_on_cuda_matches_torch_backend(tiny_checkpoint, shared_data, tmp_path):
    from sidnet.checkpoint import load_checkpoint, model_from_checkpoint
    from sidnet.export.compiled import export_compiled
    from sidnet.runtime.backends.compiled import CompiledBackend
    from sidnet.runtime.backends.torch import open_backend

    model = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
    meta = {"model": "sidnet", "anchors": model.anchors.tolist(), "num_classes": 1, "class_names": ["person"],
            "input_size": 128}  # fmt: skip
    pkg, side = export_compiled(model, tmp_path, precision="fp16", conf_thresh=0.001, topk=100, max_batch=8,
                                meta=meta, device="cuda")  # fmt: skip
    assert side["device"] == "cuda" and json.loads((tmp_path / "model.pt2.json").read_text())["precision"] == "fp16"
    images, _ = _cpu_batch(video_frames(shared_data, 3), 128)
    comp = CompiledBackend(pkg)
    ref = open_backend(tiny_checkpoint, device="cuda", precision="fp16", conf_thresh=0.001)
    for _ in range(2):
        d1, n1 = comp.infer(images)
    d2, n2 = ref.infer(images)
    _assert_same_rows(d1, n1, d2, n2, score_tol=2e-2, box_tol=8.0)


def test_tensorrt_backend_reaches_the_tensorrt_import_through_pycuda(tmp_path):
    pytest.importorskip("pycuda.driver", reason="pycuda wheel not installed (benchmarks/run_gpu.sh installs .whl)")
    from sidnet.runtime.backends.tensorrt import TensorRTBackend
    from sidnet.runtime.errors import DeployError

    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not a real plan")
    side = {"backend": "tensorrt", "backend_version": "10.13.0", "input_size": 416, "anchors": [[1, 2]] * 3,
            "conf_thresh": 0.001, "topk": 100, "precision": "fp16", "compute_capability": "9.0"}  # fmt: skip
    (tmp_path / "model.engine.json").write_text(json.dumps(side))
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(DeployError, match="needs the tensorrt Python package"):
            TensorRTBackend(engine)
    else:  # full TensorRT present: the sidecar check must stop the fake plan before deserialising
        with pytest.raises(DeployError):
            TensorRTBackend(engine)
