"""FP32 ONNX (native target, after surgery) → explicit-quantization (Q/DQ) ONNX with nvidia-modelopt.

modelopt (``modelopt.onnx.quantization``, NVIDIA's tool for TensorRT explicit quantization) decides where Q/DQ pairs
go (TensorRT-friendly: per-channel symmetric weights, per-tensor symmetric activations on the inputs of Conv/Add/…,
so Conv+BN+ReLU fuse in INT8). Activation ranges come from our own streaming calibration
(:mod:`sidnet.quant.calibration`): modelopt's calibrators keep every batch's activations in memory and know only
entropy and max, so we hand it a TensorRT calibration cache instead (``calibration_cache_path``), which it reads back
into the Q/DQ scales. That one cache is also the file implicit-INT8 TensorRT users load, so the Q/DQ model and the
cache come from the same calibration by construction.

Three passes: (1) a placement probe (modelopt on one batch) lists the activation tensors it quantizes; (2) the
streamed calibration over those tensors → amax → cache; (3) modelopt again with the cache. Kept out of INT8 by
default: the last 1x1 conv (the head output ``raw``) and everything after it (region decode, sigmoid, top-K), plus
any node named in ``exclude`` (the accuracy gate's fallback adds to it).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from sidnet.graph.errors import ExportError
from sidnet.graph.wrapper import INPUT_NAME, RAW_NAME
from sidnet.quant.calibration import CalibrationError

log = logging.getLogger("sidnet.quant.qdq")

INSTALL_HINT = "pip install -e '.[int8]' (nvidia-modelopt and the few packages it imports)"
HIGH_PRECISION = ("fp32", "fp16")


def import_quietly(module: str, *, needed_by: str, error: type[Exception] = ExportError):
    """``import module`` (a modelopt part) without its import-time chatter; missing → one line naming the extra."""
    import importlib

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return importlib.import_module(module)
    except ImportError as e:
        raise error(f"{needed_by} needs {module} ({e}): {INSTALL_HINT}") from e


def import_modelopt():
    return import_quietly("modelopt.onnx.quantization", needed_by="INT8 export").quantize


def head_and_decode_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the node producing ``raw`` (the last 1x1 conv) and of every node downstream of it (the decode)."""
    producers = [n for n in model.graph.node if RAW_NAME in n.output]
    if not producers:
        raise ExportError(f"no tensor '{RAW_NAME}' in the FP32 graph: INT8 quantizes the graph after surgery")
    names, frontier = {producers[0].name}, {RAW_NAME}
    for node in model.graph.node:  # graph is topologically sorted after surgery
        if frontier.intersection(node.input):
            names.add(node.name)
            frontier.update(node.output)
    return [n.name for n in model.graph.node if n.name in names]


def quantize_with_modelopt(
    fp32_path: Path,
    *,
    batch: np.ndarray,
    exclude: Sequence[str],
    cache: Path | None = None,
    high_precision: str = "fp32",
) -> onnx.ModelProto:
    """One modelopt INT8 pass on CPU. With ``cache``, the activation scales are the cache's; ``batch`` is what
    modelopt's own (then overwritten) calibration pass runs on."""
    if high_precision not in HIGH_PRECISION:
        raise ExportError(f"int8.high_precision={high_precision!r}: use fp32 or fp16 (outside Q/DQ)")
    quantize = import_modelopt()
    fd, tmp = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantize(
                str(fp32_path),
                quantize_mode="int8",
                calibration_data={INPUT_NAME: batch},
                calibration_method="max",
                calibration_cache_path=str(cache) if cache else None,
                calibration_eps=["cpu"],
                nodes_to_exclude=[f"^{re.escape(n)}$" for n in exclude],
                high_precision_dtype=high_precision,
                output_path=tmp,
                log_level="CRITICAL",  # its NVML probe logs an ERROR on machines without a GPU
            )
        return onnx.load(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def activation_scales(qdq: onnx.ModelProto) -> dict[str, float]:
    """``{activation tensor: INT8 scale}`` of every QuantizeLinear whose input is not a weight."""
    inits = _initializers(qdq)
    out = {}
    for node in qdq.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            out[node.input[0]] = float(np.asarray(inits[node.input[1]]).reshape(-1)[0])
    return out


def quantized_layers(qdq: onnx.ModelProto) -> list[str]:
    """Names of the compute nodes that read a DequantizeLinear output (the layers that run in INT8), in order."""
    dq_out = {o for n in qdq.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [
        n.name
        for n in qdq.graph.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and dq_out.intersection(n.input)
    ]


def check_cache_applied(qdq: onnx.ModelProto, scales: dict[str, float]) -> None:
    """Every activation Q/DQ of ``qdq`` must carry the cache's scale (modelopt silently keeps its own otherwise)."""
    got = activation_scales(qdq)
    bad = [t for t, s in got.items() if t not in scales or not np.isclose(s, scales[t], rtol=1e-6, atol=0)]
    if bad:
        raise CalibrationError(
            f"{len(bad)} activation scale(s) of the Q/DQ model differ from the calibration cache (first: {bad[0]}); "
            "the cache does not belong to this graph: recalibrate with --force"
        )


def placement(qdq: onnx.ModelProto, scopes: dict) -> tuple[dict[str, str], list[str]]:
    """modelopt's Q/DQ placement in module terms: ``({module path: the quantized activation tensor it reads}, [conv
    paths whose weights are quantized])`` — what QAT fake-quantizes (:mod:`sidnet.quant.qat`).

    A node reading a DequantizeLinear output of an activation is a site: a Conv is named by its weight initializer
    (``model.<path>.weight``, the network being ``model`` in :class:`~sidnet.graph.wrapper.DeployModel`), any other
    node (MaxPool, a residual Add) by the innermost module that traced it (``scopes``:
    :func:`sidnet.graph.onnx_export.module_scopes` of the graph before surgery, whose node names surgery keeps and
    modelopt too). For an Add that module's input is the tensor (MobileNetV2's ``x + conv(x)``).
    """
    inits = {t.name for t in qdq.graph.initializer}
    q_src = {n.output[0]: n.input[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    dq_src = {n.output[0]: q_src.get(n.input[0], n.input[0]) for n in qdq.graph.node if n.op_type == "DequantizeLinear"}

    def path(name: str) -> str:
        return name.removeprefix("model.").removesuffix(".weight")

    sites: dict[str, str] = {}
    weights = []
    for node in qdq.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i in node.input:
            src = dq_src.get(i)
            if src is None:
                continue
            if src in inits:
                if node.op_type == "Conv" and src.startswith("model."):
                    weights.append(path(src))
                continue
            if node.op_type == "Conv":
                module = path(dq_src.get(node.input[1], node.input[1]))
            else:
                module = (scopes.get(node.name) or ("",))[-1].removeprefix("model.")
            if not module:
                raise ExportError(f"cannot tell which module {node.op_type} node {node.name} reading quantized "
                                  f"{src} belongs to: QAT needs module scopes in the exported graph")  # fmt: skip
            if sites.setdefault(module, src) != src:
                raise ExportError(f"module {module} reads two quantized tensors ({sites[module]}, {src}): "
                                  "QAT quantizes one input per module")  # fmt: skip
    return sites, weights


def model_placement(model, *, opset: int = 18, exclude: Sequence[str] = ()) -> tuple[dict[str, str], list[str]]:
    """:func:`placement` of ``model`` as ``python -m export --precision int8`` would quantize it (FP32 native graph
    after surgery, :func:`sidnet.graph.build.build_graph`, last 1x1 conv and decode excluded, modelopt on one random
    batch: placement only). The graph is traced from an FP32 CPU copy, as ``python -m export`` does: QAT calls this
    on a model already on the GPU, and torch 2.11's exporter failed on the CUDA model ("always_classified is
    unsupported", H100)."""
    import copy

    from sidnet.graph.build import build_graph
    from sidnet.graph.onnx_export import module_scopes
    from sidnet.graph.wrapper import DeployModel

    model = copy.deepcopy(model).float().cpu().eval()
    exported, final, _ = build_graph(DeployModel(model, conf_thresh=0.001, topk=100).eval(), target="native",
                                     precision="fp32", opset=opset)  # fmt: skip
    return graph_placement(final, module_scopes(exported), size=model.input_size, exclude=exclude)


def graph_placement(final: onnx.ModelProto, scopes: dict, *, size: int, exclude: Sequence[str] = ()):
    """:func:`placement` of an exported graph: ``final`` (its FP32 ONNX after surgery, what modelopt quantizes) and
    ``scopes`` (:func:`sidnet.graph.onnx_export.module_scopes` of torch.onnx's program: node → module path)."""
    return placement(placement_probe(final, size=size, exclude=exclude), scopes)


def placement_probe(fp32: onnx.ModelProto, *, size: int, exclude: Sequence[str] = ()) -> onnx.ModelProto:
    """modelopt on ``fp32`` with one random image: where the Q/DQ nodes go (its scales are meaningless)."""
    batch = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fp32.onnx"
        onnx.save(fp32, str(path))
        return quantize_with_modelopt(path, batch=batch, exclude=[*head_and_decode_nodes(fp32), *exclude])


def qat_tensor_amax(sites: dict[str, str], module_amax: dict[str, float]) -> dict[str, float]:
    """QAT ranges ``{module path: input amax}`` → ``{ONNX tensor: amax}`` through :func:`placement`'s sites.

    A tensor read by several sites (a block input read by its conv and its residual Add, a tensor feeding two convs)
    gets one scale: their ranges are equal from calibration (same tensor, same histogram), and the largest is kept
    should they differ.
    """
    missing = sorted(set(sites) - set(module_amax))
    if missing:
        raise ExportError(f"the QAT checkpoint has no range for {len(missing)} quantized layer(s) of this export "
                          f"(first: {missing[0]}): the Q/DQ placement changed since it was trained (modelopt "
                          "version?); fine-tune again with this version")  # fmt: skip
    by_tensor = ranges_by_tensor(sites, module_amax)
    for tensor, ranges in by_tensor.items():
        values = list(ranges.values())
        if max(values) > min(values) * (1 + 1e-6):
            log.info("int8: %s read by %d QAT-quantized layers with ranges %s: keeping the largest", tensor,
                     len(values), ", ".join(f"{v:.4g}" for v in values))  # fmt: skip
    return {t: max(r.values()) for t, r in by_tensor.items()}


def ranges_by_tensor(sites: dict[str, str], module_amax: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{ONNX tensor: {module path: its input amax}}``: the QAT ranges grouped by the tensor the modules read."""
    by_tensor: dict[str, dict[str, float]] = {}
    for module, tensor in sites.items():
        by_tensor.setdefault(tensor, {})[module] = float(module_amax[module])
    return by_tensor
