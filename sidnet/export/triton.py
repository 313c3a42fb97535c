"""A Triton Inference Server model repository from an export: ``python -m export --backend triton``.

    <out>/<name>/config.pbtxt        # platform, max_batch_size, dynamic batching, instance groups, I/O, parameters
    <out>/<name>/1/model.onnx        # or model.plan (triton.format=plan: a full-TensorRT engine, built by the export)

Everything in ``config.pbtxt`` is read from the artifact, never typed by hand: input/output names, data types and dims
come from the ONNX graph (the batch axis dropped: Triton adds it back as ``max_batch_size``; an output that is only
the batch axis, ``num_detections`` [N], becomes ``dims: [1]`` with ``reshape { shape: [] }``, Triton's idiom for it);
``max_batch_size`` and the preferred batch sizes are the export's batch profile (``batch.opt``, ``batch.max``), the
same the engine was optimised for. The ONNX metadata the runtime needs (input size, anchors, class names, the export
threshold, precision) goes into ``parameters { key: "sidnet_info" }`` as JSON, so a client
(:mod:`sidnet.runtime.backends.triton`) learns the model from the server. Checked in the tests with Triton's own
``model_config.proto`` (``tritonclient.grpc.model_config_pb2`` + ``google.protobuf.text_format``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import onnx

from sidnet.graph.errors import ExportError

# ONNX TensorProto element type -> Triton DataType (model_config.proto).
TRITON_DTYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "plan": ("tensorrt_plan", "model.plan")}
KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
_SEP = ",\n"
INFO_KEYS = ("model", "input_size", "anchors", "num_classes", "class_names", "conf_thresh", "topk", "precision")


def tensor_specs(model: onnx.ModelProto) -> tuple[list[dict], list[dict], bool]:
    """(inputs, outputs, batched): tensors as ``{"name", "data_type", "dims"}``. ``batched`` when every tensor's
    first axis is the dynamic batch (the detector export's contract): dims then leave it out, as Triton wants with
    ``max_batch_size > 0``; otherwise (a static graph such as Mask R-CNN's) dims are the full static shape. Any
    other dynamic axis is an error."""

    def dims_of(value: onnx.ValueInfoProto) -> list[int | None]:
        t = value.type.tensor_type
        if t.elem_type not in TRITON_DTYPES:
            raise ExportError(f"tensor {value.name}: ONNX element type {t.elem_type} has no Triton data type")
        return [int(d.dim_value) if d.HasField("dim_value") else None for d in t.shape.dim]

    values = [*model.graph.input, *model.graph.output]
    shapes = [dims_of(v) for v in values]
    batched = all(s and s[0] is None for s in shapes)
    specs = []
    for value, shape in zip(values, shapes, strict=True):
        dims = shape[1:] if batched else shape
        if any(d is None for d in dims):
            raise ExportError(f"tensor {value.name}: shape {shape} has a dynamic axis besides the batch; Triton "
                              "needs static dims (export with a fixed size)")  # fmt: skip
        specs.append({"name": value.name, "data_type": TRITON_DTYPES[value.type.tensor_type.elem_type], "dims": dims})
    n = len(model.graph.input)
    return specs[:n], specs[n:], batched


def _tensor_block(spec: dict) -> str:
    lines = [f'    name: "{spec["name"]}"', f"    data_type: {spec['data_type']}"]
    if spec["dims"]:
        lines.append(f"    dims: [ {', '.join(map(str, spec['dims']))} ]")
    else:  # per-request scalar ([N] with the batch): Triton needs one dim, reshaped away
        lines += ["    dims: [ 1 ]", "    reshape { shape: [ ] }"]
    return "  {\n" + "\n".join(lines) + "\n  }"


def _quote(text: str) -> str:
    """A protobuf text-format string literal (UTF-8 kept as is: text_format reads it, not JSON's \\u escapes)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def config_text(*, name: str, platform: str, inputs: list[dict], outputs: list[dict], max_batch: int,
                preferred: list[int], queue_delay_us: int, instances: int, kind: str,
                parameters: dict[str, str]) -> str:  # fmt: skip
    """``config.pbtxt`` in protobuf text format (``inference.ModelConfig``)."""
    batching = (
        f"dynamic_batching {{\n  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
        f"  max_queue_delay_microseconds: {queue_delay_us}\n}}\n"
        if max_batch > 0
        else ""
    )
    params = "\n".join(
        f'parameters {{\n  key: "{k}"\n  value {{ string_value: {_quote(v)} }}\n}}' for k, v in parameters.items()
    )
    return (
        f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch}\n'
        f"input [\n{_SEP.join(_tensor_block(s) for s in inputs)}\n]\n"
        f"output [\n{_SEP.join(_tensor_block(s) for s in outputs)}\n]\n"
        f"{batching}instance_group [\n  {{\n    count: {instances}\n    kind: {KINDS[kind]}\n  }}\n]\n"
        f"{params}\n"
    )


def write_repository(onnx_path: Path, out_dir: Path, *, name: str, batch: tuple[int, int, int], fmt: str = "onnx",
                     engine_path: Path | None = None, instances: int = 1, kind: str = "gpu",
                     queue_delay_us: int = 100) -> Path:  # fmt: skip
    """Write ``out_dir/<name>/{config.pbtxt, 1/model.*}`` for the exported ``onnx_path`` (and ``engine_path`` when
    ``fmt="plan"``); returns the ``config.pbtxt`` path. ``batch``: the export's (min, opt, max) profile."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ExportError(f"triton.name={name!r}: use letters, digits, '.', '_' and '-' (it is a folder name)")
    if fmt not in PLATFORMS:
        raise ExportError(f"triton.format={fmt!r}: use onnx (onnxruntime backend) or plan (TensorRT backend)")
    if kind not in KINDS:
        raise ExportError(f"triton.kind={kind!r}: use gpu or cpu (instance_group kind)")
    if instances < 1:
        raise ExportError(f"triton.instances={instances} must be >= 1")
    model = onnx.load(str(onnx_path), load_external_data=False)
    inputs, outputs, batched = tensor_specs(model)
    meta = {p.key: p.value for p in model.metadata_props}
    info = {k: json.loads(meta[k]) if meta.get(k, "").startswith(("[", "{")) else meta.get(k) for k in INFO_KEYS}
    for k in ("input_size", "num_classes", "topk"):
        info[k] = None if info[k] is None else int(info[k])
    info["conf_thresh"] = None if info["conf_thresh"] is None else float(info["conf_thresh"])
    _, opt, hi = batch if batched else (0, 0, 0)  # a static graph: max_batch_size 0, no dynamic batching
    platform, filename = PLATFORMS[fmt]
    text = config_text(name=name, platform=platform, inputs=inputs, outputs=outputs, max_batch=hi,
                       preferred=sorted({opt, hi}), queue_delay_us=queue_delay_us, instances=instances, kind=kind,
                       parameters={"sidnet_info": json.dumps(info, ensure_ascii=False),
                                   "precision": str(info["precision"])})  # fmt: skip
    model_dir = out_dir / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    source = engine_path if fmt == "plan" else onnx_path
    if source is None:
        raise ExportError("triton.format=plan needs the engine the export builds (--backend tensorrt)")
    _link_or_copy(source, model_dir / "1" / filename)
    from sidnet.io import atomic_write_text

    config = model_dir / "config.pbtxt"
    atomic_write_text(config, text)
    return config


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no second copy on disk) where the file system allows, else a copy; replaces ``dst``."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
