"""TensorRT plugins ``sidnet::Reorg``, ``sidnet::RegionDecode``, ``sidnet::PyramidRoIAlign`` in Python (``IPluginV3``),
launching ``csrc/``.

**Status: written against the TensorRT 10/11 Python plugin API and never run.** Full TensorRT cannot be installed on
the project's machines and TensorRT-RTX has no plugin layer (``../shared/docs/platform.md``); the classes are only
instantiated in CI against TensorRT-RTX's bindings of the same interfaces, which checks attribute parsing and
serialisation, not a build or an ``enqueue``. No C++ plugin is written because no TensorRT headers are reachable.

How it fits together:

- ``register_plugins()`` loads ``libsidnet_kernels.so`` (ctypes, :func:`sidnet.kernels.load_library`) and registers
  one ``IPluginCreatorV3One`` per op under namespace ``sidnet``. Call it before parsing an ONNX with plugin nodes and
  before deserialising an engine built from one (the engine stores the fields, not the Python code).
- TensorRT's ONNX parser maps a node to a creator by op type + the node's ``plugin_namespace``/``plugin_version``
  attributes and hands the node's attributes over as ``PluginField``s, which :func:`_read_fields` parses; the same
  fields are what :meth:`get_fields_to_serialize` writes into the engine.
- ``enqueue`` calls the C launchers with TensorRT's raw device pointers and stream. ``Reorg`` runs in FP32 or FP16
  (the output takes the input's type); ``RegionDecode`` reads FP32 or FP16 and writes FP32 detections and INT32
  counts, with its top-K scratch in TensorRT's workspace. Its anchors are an attribute, but the launcher reads them
  from device memory: the runtime copy of the plugin uploads them once in ``attach_to_context`` (with torch, a
  dependency anyway; the launcher library exports no memcpy).
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from sidnet.graph.errors import PluginError
from sidnet.io import sha256_file

NAMESPACE = "sidnet"
VERSION = "1"
_REGISTERED: list[Any] = []  # creators must outlive registration: the registry holds raw pointers to them

# Field kinds: "i" one int32, "f" one float32, "F" a float32 list.
REORG_FIELDS = {"stride": "i", "version": "i"}
REGION_FIELDS = {
    "anchors": "F",
    "num_anchors": "i",
    "num_classes": "i",
    "stride_x": "f",
    "stride_y": "f",
    "conf_thresh": "f",
    "topk": "i",
    "version": "i",
}
PYRAMID_FIELDS = {
    "output_size": "i",
    "sampling_ratio": "i",
    "scales": "F",
    "min_level": "i",
    "canonical_level": "f",
    "canonical_size": "f",
    "version": "i",
}


def import_tensorrt() -> ModuleType:
    """Full TensorRT, or a :class:`PluginError` naming the way out."""
    try:
        import tensorrt
    except ImportError as e:
        raise PluginError(
            "the sidnet TensorRT plugins need full TensorRT >= 10, which is not importable here: "
            "pip install tensorrt-cu12 (NVIDIA's index); for TensorRT-RTX or onnxruntime export with "
            "--target native instead"
        ) from e
    return tensorrt


def _read_fields(fc, spec: dict[str, str], op: str) -> dict[str, Any]:
    """PluginFieldCollection → plain values; fields not in ``spec`` (the parser also passes the plugin_* strings)
    are ignored, missing ones are an error."""
    values: dict[str, Any] = {}
    for f in fc:
        kind = spec.get(f.name)
        if kind is None:
            continue
        data = np.asarray(f.data).reshape(-1)
        values[f.name] = data.astype(np.float32).tolist() if kind == "F" else (float if kind == "f" else int)(data[0])
    missing = sorted(set(spec) - set(values) - {"version"})
    if missing:
        raise PluginError(f"sidnet::{op} is missing attribute(s) {missing}: re-export the ONNX with python -m export")
    if values.setdefault("version", int(VERSION)) != int(VERSION):
        raise PluginError(
            f"sidnet::{op} version {values['version']} is not supported by this sidnet "
            f"(plugin version {VERSION}): re-export the ONNX with this sidnet"
        )
    return values


@functools.cache
def plugin_classes(trt: ModuleType) -> tuple[type, type, type, type]:
    """(ReorgPlugin, RegionDecodePlugin, Creator, PyramidRoIAlignPlugin) bound to ``trt``; defined lazily because the
    base classes live in
    the ``tensorrt`` module, which must stay an optional import."""
    DT = trt.DataType

    def ftype(kind: str):
        return trt.PluginFieldType.INT32 if kind == "i" else trt.PluginFieldType.FLOAT32

    class SidnetPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        op = ""
        spec: dict[str, str] = {}
        outputs = 1

        def __init__(self, lib, attrs: dict[str, Any]) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_namespace, self.plugin_version = self.op, NAMESPACE, VERSION
            self.num_outputs = self.outputs
            self.lib, self.attrs = lib, dict(attrs)

        def get_capability_interface(self, capability_type):
            return self

        def clone(self):
            return type(self)(self.lib, self.attrs)

        def get_fields_to_serialize(self):
            # A PluginField points at its array's memory: keep the arrays alive as long as the plugin (a temporary
            # array would be freed before TensorRT reads it; the CI test caught exactly that).
            self.field_arrays = {
                k: np.atleast_1d(np.asarray(v, dtype=np.int32 if self.spec[k] == "i" else np.float32))
                for k, v in self.attrs.items()
            }
            return trt.PluginFieldCollection(
                [trt.PluginField(k, a, ftype(self.spec[k])) for k, a in self.field_arrays.items()]
            )

        def configure_plugin(self, inputs, outputs) -> None:
            pass

        def on_shape_change(self, inputs, outputs) -> None:
            pass

        def attach_to_context(self, context):
            return self.clone()

        def get_workspace_size(self, inputs, outputs) -> int:
            return 0

        def check(self, err: int, launcher: str) -> None:
            if err != 0:
                msg = self.lib.sidnetGetErrorString(err).decode()
                raise PluginError(f"sidnet::{self.op}: {launcher} failed: {msg} (cudaError_t {err})")

    def dtype_code(t) -> int:
        return 0 if t == DT.FLOAT else 1  # SIDNET_DTYPE_FLOAT32 / FLOAT16 (csrc/common/sidnetCommon.h)

    class ReorgPlugin(SidnetPlugin):
        """(N, C, H, W) → (N, C·s², H/s, W/s), ONNX SpaceToDepth order, FP32 or FP16."""

        op, spec = "Reorg", REORG_FIELDS

        def get_output_data_types(self, input_types):
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            x, s = inputs[0], self.attrs["stride"]
            out = trt.DimsExprs(x)
            out[1] = expr_builder.operation(trt.DimensionOperation.PROD, x[1], expr_builder.constant(s * s))
            out[2] = expr_builder.operation(trt.DimensionOperation.FLOOR_DIV, x[2], expr_builder.constant(s))
            out[3] = expr_builder.operation(trt.DimensionOperation.FLOOR_DIV, x[3], expr_builder.constant(s))
            return [out]

        def supports_format_combination(self, pos, in_out, num_inputs) -> bool:
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            return desc.type in (DT.FLOAT, DT.HALF) if pos == 0 else desc.type == in_out[0].desc.type

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream) -> None:
            n, c, h, w = tuple(input_desc[0].dims)
            err = self.lib.reorgForward(
                inputs[0], outputs[0], dtype_code(input_desc[0].type), n, c, h, w, self.attrs["stride"], stream
            )
            self.check(err, "reorgForward")

    class RegionDecodePlugin(SidnetPlugin):
        """raw (N, A·(5+C), H, W) FP32/FP16 → detections FP32 (N, topk, 6), num_detections INT32 (N,)."""

        op, spec, outputs = "RegionDecode", REGION_FIELDS, 2

        def __init__(self, lib, attrs: dict[str, Any]) -> None:
            super().__init__(lib, attrs)
            self.anchors_device = None  # uploaded by the runtime copy, see attach_to_context

        def get_output_data_types(self, input_types):
            return [DT.FLOAT, DT.INT32]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            n = inputs[0][0]
            dets, num = trt.DimsExprs(3), trt.DimsExprs(1)
            dets[0], dets[1], dets[2] = n, expr_builder.constant(self.attrs["topk"]), expr_builder.constant(6)
            num[0] = n
            return [dets, num]

        def supports_format_combination(self, pos, in_out, num_inputs) -> bool:
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            return desc.type in ((DT.FLOAT, DT.HALF), (DT.FLOAT,), (DT.INT32,))[pos]

        def get_workspace_size(self, inputs, outputs) -> int:
            n, _, h, w = tuple(inputs[0].max)  # the profile's largest shape bounds every enqueue
            return int(self.lib.regionTopKWorkspaceSize(n, self.attrs["num_anchors"], h, w, self.attrs["topk"]))

        def clone(self):
            plugin = super().clone()
            plugin.anchors_device = self.anchors_device
            return plugin

        def attach_to_context(self, context):
            import torch

            plugin = self.clone()
            if plugin.anchors_device is None:
                plugin.anchors_device = torch.tensor(self.attrs["anchors"], dtype=torch.float32, device="cuda")
                torch.cuda.synchronize()  # the pageable upload must land before a kernel on TensorRT's stream reads it
            return plugin

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream) -> None:
            if self.anchors_device is None:
                raise PluginError("sidnet::RegionDecode: enqueue before attach_to_context (no device anchors)")
            a, c, k = self.attrs["num_anchors"], self.attrs["num_classes"], self.attrs["topk"]
            n, _, h, w = tuple(input_desc[0].dims)
            ws_bytes = int(self.lib.regionTopKWorkspaceSize(n, a, h, w, k))
            sx, sy, conf = self.attrs["stride_x"], self.attrs["stride_y"], self.attrs["conf_thresh"]
            ws = workspace if ws_bytes else None
            err = self.lib.regionTopK(
                inputs[0], dtype_code(input_desc[0].type), self.anchors_device.data_ptr(), n, a, c, h, w, sx, sy, conf,
                k, outputs[0], outputs[1], ws, ws_bytes, stream,
            )  # fmt: skip
            self.check(err, "regionTopK")

    class Creator(trt.IPluginCreatorV3One):
        def __init__(self, plugin_cls: type, lib) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = plugin_cls.op, NAMESPACE, VERSION
            self.empty = np.array([], dtype=np.float32)  # declared fields carry no data; kept alive for the same reason
            self.field_names = trt.PluginFieldCollection(
                [trt.PluginField(k, self.empty, ftype(kind)) for k, kind in plugin_cls.spec.items()]
            )
            self.plugin_cls, self.lib = plugin_cls, lib

        def create_plugin(self, name, fc, phase):
            return self.plugin_cls(self.lib, _read_fields(fc, self.plugin_cls.spec, self.plugin_cls.op))

    class PyramidRoIAlignPlugin(SidnetPlugin):
        """(features (N, C, H_l, W_l) finest first..., rois (N, R, 4) FP32) → (N, R, C, P, P), the features' type."""

        op, spec = "PyramidRoIAlign", PYRAMID_FIELDS

        def get_output_data_types(self, input_types):
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            feat, rois, p = inputs[0], inputs[len(inputs) - 1], self.attrs["output_size"]
            out = trt.DimsExprs(5)
            out[0], out[1], out[2] = feat[0], rois[1], feat[1]
            out[3] = out[4] = expr_builder.constant(p)
            return [out]

        def supports_format_combination(self, pos, in_out, num_inputs) -> bool:
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos == num_inputs - 1:  # rois
                return desc.type == DT.FLOAT
            if pos == 0:
                return desc.type in (DT.FLOAT, DT.HALF)
            return desc.type == in_out[0].desc.type  # other levels and the output follow features[0]

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream) -> None:
            import ctypes

            levels = len(inputs) - 1
            n, c = tuple(input_desc[0].dims)[:2]
            r = tuple(input_desc[levels].dims)[1]
            ptrs = (ctypes.c_void_p * levels)(*inputs[:levels])
            hs = (ctypes.c_int * levels)(*[tuple(input_desc[i].dims)[2] for i in range(levels)])
            ws = (ctypes.c_int * levels)(*[tuple(input_desc[i].dims)[3] for i in range(levels)])
            scales = (ctypes.c_float * levels)(*self.attrs["scales"])
            p = self.attrs["output_size"]
            err = self.lib.pyramidRoiAlign(
                ptrs, levels, hs, ws, scales, dtype_code(input_desc[0].type), n, c, inputs[levels], r, p, p,
                self.attrs["sampling_ratio"], self.attrs["min_level"], self.attrs["canonical_level"],
                self.attrs["canonical_size"], outputs[0], stream,
            )  # fmt: skip
            self.check(err, "pyramidRoiAlign")

    return ReorgPlugin, RegionDecodePlugin, Creator, PyramidRoIAlignPlugin


def load_kernels(library: str | Path | None = None) -> tuple[Path, Any]:
    """(path, ctypes library) of ``libsidnet_kernels.so``; :class:`PluginError` naming the fix when it is missing."""
    from sidnet.kernels import library_path, load_library

    try:
        path = library_path(library)
        return path, load_library(path)
    except (FileNotFoundError, OSError, RuntimeError) as e:
        raise PluginError(f"the sidnet plugins need the kernels library: {e}") from e


def register_plugins(library: str | Path | None = None) -> dict[str, str]:
    """Load the kernels library and register the three creators with full TensorRT (idempotent).

    Returns ``{"library": path, "sha256": ..., "namespace": "sidnet"}`` for the engine's sidecar. Raises
    :class:`PluginError` when TensorRT or the library is missing.
    """
    trt = import_tensorrt()
    path, lib = load_kernels(library)
    reorg_cls, region_cls, creator_cls, pyramid_cls = plugin_classes(trt)
    registry = trt.get_plugin_registry()
    for cls in (reorg_cls, region_cls, pyramid_cls):
        if registry.get_creator(cls.op, VERSION, NAMESPACE) is None:
            creator = creator_cls(cls, lib)
            if not registry.register_creator(creator, NAMESPACE):
                raise PluginError(f"TensorRT refused to register sidnet::{cls.op}; is another version registered?")
            _REGISTERED.append(creator)
    return {
        "library": str(path.resolve()),
        "sha256": sha256_file(path),
        "namespace": NAMESPACE,
    }
