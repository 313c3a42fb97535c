"""The TensorRT plugins' ``enqueue`` on a GPU, without TensorRT (``-m gpu``, run by benchmarks/run_gpu.sh).

Full TensorRT cannot be installed on the project's machines, so the plugin classes are bound to a stand-in module that
only provides the names they use, and their ``attach_to_context`` / ``get_workspace_size`` / ``enqueue`` are called as
TensorRT would call them: raw device pointers, descriptors with dims and type, a workspace, a CUDA stream. This checks
our side of the contract (argument order and types of the ctypes launchers, dtype codes, workspace sizing, the anchor
upload) against the PyTorch references; TensorRT's side (parser, builder, engine) stays unverified.
"""

from __future__ import annotations

import enum
import os
import types

import pytest
import torch

from sidnet.export.trt_plugins import load_kernels, plugin_classes
from sidnet.models.layers import reorg as ref_reorg
from sidnet.models.region import region_topk as ref_topk

ANCHORS = [[12.0, 24.0], [30.0, 60.0], [70.0, 110.0], [150.0, 100.0], [300.0, 280.0]]


def _stand_in_tensorrt() -> types.ModuleType:
    """The subset of the ``tensorrt`` module the plugin classes touch; interfaces are empty base classes."""
    trt = types.ModuleType("tensorrt_stand_in")
    for name in ("IPluginV3", "IPluginV3OneCore", "IPluginV3OneBuild", "IPluginV3OneRuntime", "IPluginCreatorV3One"):
        setattr(trt, name, type(name, (), {"__init__": lambda self: None}))
    trt.DataType = enum.Enum("DataType", {"FLOAT": 0, "HALF": 1, "INT32": 3})
    trt.PluginFieldType = enum.Enum("PluginFieldType", {"FLOAT32": 1, "INT32": 5})
    trt.TensorFormat = enum.Enum("TensorFormat", {"LINEAR": 0})
    trt.PluginField = lambda name, data, kind: types.SimpleNamespace(name=name, data=data, type=kind)
    trt.PluginFieldCollection = list
    return trt


@pytest.fixture(scope="module")
def classes():
    if not torch.cuda.is_available():
        if os.environ.get("SIDNET_REQUIRE_GPU") == "1":
            pytest.fail("SIDNET_REQUIRE_GPU=1 but torch.cuda.is_available() is False")
        pytest.skip("needs CUDA; run benchmarks/run_gpu.sh on the GPU machine")
    _, lib = load_kernels()
    trt = _stand_in_tensorrt()
    reorg_cls, region_cls, _, _ = plugin_classes(trt)
    return trt, lib, reorg_cls, region_cls


def _desc(t: torch.Tensor, trt) -> types.SimpleNamespace:
    kind = {torch.float32: trt.DataType.FLOAT, torch.float16: trt.DataType.HALF, torch.int32: trt.DataType.INT32}
    return types.SimpleNamespace(dims=tuple(t.shape), type=kind[t.dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(1, 64, 26, 26), (5, 3, 14, 6)])
def test_reorg_plugin_enqueue_matches_reference(classes, dtype, shape):
    trt, lib, reorg_cls, _ = classes
    plugin = reorg_cls(lib, {"stride": 2, "version": 1}).attach_to_context(None)
    x = torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).to(dtype)
    n, c, h, w = shape
    out = torch.full((n, 4 * c, h // 2, w // 2), float("nan"), dtype=dtype, device="cuda")
    stream = torch.cuda.current_stream()
    plugin.enqueue([_desc(x, trt)], [_desc(out, trt)], [x.data_ptr()], [out.data_ptr()], 0, stream.cuda_stream)
    stream.synchronize()
    assert torch.equal(out, ref_reorg(x, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n,c,h,w,topk", [(1, 1, 13, 13, 100), (64, 1, 13, 13, 100), (3, 4, 7, 5, 2000)])
def test_region_decode_plugin_enqueue_matches_reference(classes, dtype, n, c, h, w, topk):
    trt, lib, _, region_cls = classes
    a = len(ANCHORS)
    attrs = {
        "anchors": sum(ANCHORS, []),
        "num_anchors": a,
        "num_classes": c,
        "stride_x": 32.0,
        "stride_y": 32.0,
        "conf_thresh": 0.05,
        "topk": topk,
        "version": 1,
    }
    build = region_cls(lib, attrs)
    raw = (torch.randn(n, a * (5 + c), h, w, device="cuda", generator=torch.Generator("cuda").manual_seed(1)) * 2).to(
        dtype
    )
    # TensorRT sizes the workspace for the profile's largest shape, then enqueues a smaller batch.
    ws_bytes = build.get_workspace_size([types.SimpleNamespace(max=(64, *raw.shape[1:]))], None)
    workspace = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device="cuda")
    plugin = build.attach_to_context(None)
    dets = torch.full((n, topk, 6), float("nan"), device="cuda")
    num = torch.full((n,), -1, dtype=torch.int32, device="cuda")
    stream = torch.cuda.current_stream()
    plugin.enqueue(
        [_desc(raw, trt)],
        [_desc(dets, trt), _desc(num, trt)],
        [raw.data_ptr()],
        [dets.data_ptr(), num.data_ptr()],
        workspace.data_ptr(),
        stream.cuda_stream,
    )
    stream.synchronize()
    ref_dets, ref_num = ref_topk(raw.float(), torch.tensor(ANCHORS), stride=(32.0, 32.0), conf_thresh=0.05, topk=topk)
    assert torch.equal(num.cpu(), ref_num.cpu())
    torch.testing.assert_close(_by_x1(dets, num), _by_x1(ref_dets.to(dets.device), num), rtol=1e-5, atol=1e-3)


def _by_x1(dets: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
    """Valid rows reordered by x1: two scores within float rounding may come out in either order (not a bug here)."""
    out = dets.clone()
    for i, k in enumerate(num.tolist()):
        out[i, :k] = dets[i, :k][torch.argsort(dets[i, :k, 0])]
    return out
