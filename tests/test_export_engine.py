"""Engines and plugins on the CPU: real TensorRT-RTX builds of the native target (FP32, FP16), the errors for plugin
graphs and missing pieces, and the Python plugin classes exercised against TensorRT-RTX's bindings of the same
``IPluginV3`` interfaces (attribute parsing and serialisation only: nothing here builds or runs a plugin; full
TensorRT is not installable on these machines).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from sidnet.checkpoint import save_checkpoint
from sidnet.export.adapters import calibrate_batchnorm
from sidnet.export.config import ExportConfig
from sidnet.export.engine import build_engine
from sidnet.export.pipeline import run_export
from sidnet.graph.errors import BackendUnavailable, EngineBuildError, PluginError
from sidnet.io import sha256_file
from sidnet.models import build_model

ROOT = Path(__file__).resolve().parents[1]
ANCHORS = [[12.0, 24.0], [30.0, 60.0], [70.0, 110.0]]
HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx not importable: pip install 'sidnet[tensorrt-rtx]'")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = calibrate_batchnorm(build_model("sidnet", anchors=ANCHORS, input_size=128, width=0.125))
    spec = {"name": "sidnet", "anchors": ANCHORS, "num_classes": 1, "input_size": 128, "kwargs": {"width": 0.125}}
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint({"model": spec, "model_state": model.state_dict(), "ema": None}, path)
    return path


@needs_rtx
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_rtx_builds_native_engine(checkpoint, tmp_path, precision):
    cfg = ExportConfig(checkpoint=str(checkpoint), out=str(tmp_path), precision=precision, backend="tensorrt-rtx")
    result = run_export(cfg, project_root=ROOT)
    assert result.options.target == "native" and result.parity.passed, result.parity.summary()
    engine = tmp_path / "model.engine"
    assert engine.stat().st_size > 10_000
    info = json.loads((tmp_path / "model.engine.json").read_text())
    assert info["backend"] == "tensorrt-rtx" and info["backend_version"].startswith("1.")
    assert info["precision"] == precision and info["strongly_typed"] and info["plugins"] is None
    assert info["input"]["profile"] == {"min": [1, 3, 128, 128], "opt": [16, 3, 128, 128], "max": [64, 3, 128, 128]}
    assert info["anchors"] == ANCHORS and info["topk"] == 100 and info["class_names"] == ["person"]
    assert info["onnx"]["sha256"] == sha256_file(tmp_path / "model.onnx") and info["engine_sha256"] == sha256_file(
        engine
    )
    assert info["built_on"] and "no-op" in info["timing_cache"]
    layers = json.loads((tmp_path / "layers.json").read_text())
    assert layers["onnx_nodes"] == len(onnx.load(str(tmp_path / "model.onnx")).graph.node)
    assert layers["network_layers"] > 0 and layers["network_layer_types"]["CONVOLUTION"] == 23
    if layers["engine_layers"] is None:  # no GPU here, or one TensorRT-RTX cannot run on: the report says why
        assert layers["engine_layers_note"].startswith("not available")
    assert (tmp_path / "layers.md").read_text().startswith("# Layer report")
    assert "## Engine" in (tmp_path / "report.md").read_text()
    if precision == "fp16":  # strongly typed: the FP16 is in the ONNX, with float32 I/O kept
        model = onnx.load(str(tmp_path / "model.onnx"))
        assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        casts = [n.name for n in model.graph.node if n.op_type == "Cast"]
        assert "images_to_fp16" in casts and "raw_to_fp32" in casts
        conv_w = {i.name: i for i in model.graph.initializer}[
            next(n for n in model.graph.node if n.op_type == "Conv").input[1]
        ]
        assert conv_w.data_type == onnx.TensorProto.FLOAT16


def _plugin_onnx(path: Path) -> Path:
    node = onnx.helper.make_node(
        "Reorg",
        ["x"],
        ["y"],
        name="head.reorg.Reorg",
        domain="sidnet",
        stride=2,
        version=1,
        plugin_namespace="sidnet",
        plugin_version="1",
    )
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 16, 4, 4])],
    )
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid("sidnet", 1)]
    )
    onnx.save(model, str(path))
    return path


def test_plugin_graph_on_tensorrt_rtx_is_a_one_line_error(tmp_path):
    with pytest.raises(EngineBuildError) as e:
        build_engine(_plugin_onnx(tmp_path / "p.onnx"), tmp_path, backend="tensorrt-rtx", precision="fp32")
    msg = str(e.value)
    assert "sidnet::Reorg" in msg and "head.reorg.Reorg" in msg and "--target native" in msg and "\n" not in msg


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="full TensorRT is importable here")
def test_full_tensorrt_missing_is_a_one_line_error(tmp_path):
    from sidnet.export.trt_plugins import register_plugins

    with pytest.raises(BackendUnavailable, match="backend tensorrt is not importable .*--target native"):
        build_engine(_plugin_onnx(tmp_path / "p.onnx"), tmp_path, backend="tensorrt", precision="fp32")
    with pytest.raises(PluginError, match="need full TensorRT >= 10.*--target native"):
        register_plugins()


def test_missing_kernels_library_is_a_one_line_error(tmp_path):
    from sidnet.export.trt_plugins import load_kernels

    with pytest.raises(PluginError, match=r"kernels library: .*nope\.so does not exist: build it with"):
        load_kernels(tmp_path / "nope.so")


# -- the Python IPluginV3 classes, against TensorRT-RTX's bindings of the same interfaces ------------------------------
REGION_ATTRS = {
    "anchors": sum(ANCHORS, []),
    "num_anchors": 3,
    "num_classes": 1,
    "stride_x": 32.0,
    "stride_y": 32.0,
    "conf_thresh": 0.001,
    "topk": 100,
}


def _fields(trt, attrs: dict):
    """A PluginFieldCollection as TensorRT's ONNX parser builds it from node attributes (plugin_* strings included)."""
    arrays = {
        k: np.asarray(v, dtype=np.float32 if isinstance(v, float) or isinstance(v, list) else np.int32).reshape(-1)
        for k, v in attrs.items()
    }
    arrays["plugin_namespace"] = np.frombuffer(b"sidnet", dtype=np.int8)
    kinds = {
        np.dtype(np.float32): trt.PluginFieldType.FLOAT32,
        np.dtype(np.int32): trt.PluginFieldType.INT32,
        np.dtype(np.int8): trt.PluginFieldType.CHAR,
    }
    return trt.PluginFieldCollection([trt.PluginField(k, a, kinds[a.dtype]) for k, a in arrays.items()]), arrays


def _desc(trt, dtype):
    d = trt.DynamicPluginTensorDesc()
    d.desc.type, d.desc.format = dtype, trt.TensorFormat.LINEAR
    return d


@needs_rtx
def test_plugin_creators_parse_and_serialise_fields():
    import tensorrt_rtx as trt

    from sidnet.export.trt_plugins import NAMESPACE, plugin_classes

    reorg_cls, region_cls, creator_cls, _ = plugin_classes(trt)
    creator = creator_cls(region_cls, None)
    assert (creator.name, creator.plugin_namespace, creator.plugin_version) == ("RegionDecode", NAMESPACE, "1")
    assert [f.name for f in creator.field_names] == [*REGION_ATTRS, "version"]
    fc, _arrays = _fields(trt, REGION_ATTRS)
    plugin = creator.create_plugin("decode", fc, trt.TensorRTPhase.BUILD)
    assert (
        plugin.num_outputs == 2 and plugin.attrs["anchors"] == REGION_ATTRS["anchors"] and plugin.attrs["topk"] == 100
    )
    # Round trip through the fields written into the engine (the runtime phase recreates the plugin from them).
    again = creator.create_plugin("decode", plugin.get_fields_to_serialize(), trt.TensorRTPhase.RUNTIME)
    assert again.attrs == plugin.attrs and again.clone().attrs == plugin.attrs
    assert plugin.get_output_data_types([trt.DataType.HALF]) == [trt.DataType.FLOAT, trt.DataType.INT32]
    half, f32, i32 = (_desc(trt, t) for t in (trt.DataType.HALF, trt.DataType.FLOAT, trt.DataType.INT32))
    assert [plugin.supports_format_combination(i, [half, f32, i32], 1) for i in range(3)] == [True, True, True]
    assert not plugin.supports_format_combination(1, [half, half, i32], 1)

    fc, _arrays = _fields(trt, {"stride": 2})  # the fields point into the arrays: keep them alive
    reorg = creator_cls(reorg_cls, None).create_plugin("reorg", fc, trt.TensorRTPhase.BUILD)
    assert reorg.attrs == {"stride": 2, "version": 1} and isinstance(reorg, trt.IPluginV3)
    assert reorg.get_output_data_types([trt.DataType.HALF]) == [trt.DataType.HALF]
    assert reorg.supports_format_combination(1, [half, half], 1) and not reorg.supports_format_combination(
        1, [half, f32], 1
    )

    with pytest.raises(PluginError, match="missing attribute"):
        creator.create_plugin("decode", trt.PluginFieldCollection([]), trt.TensorRTPhase.BUILD)
    fc, _arrays = _fields(trt, {**REGION_ATTRS, "version": 2})
    with pytest.raises(PluginError, match="version 2 is not supported"):
        creator.create_plugin("decode", fc, trt.TensorRTPhase.BUILD)
