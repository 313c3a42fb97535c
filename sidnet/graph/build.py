"""The YOLOv2-family deploy graph: trace :class:`~sidnet.graph.wrapper.DeployModel` to ONNX and run the surgery.

Used by the export (:mod:`sidnet.export.adapters`) and by QAT's placement (:func:`sidnet.quant.qdq.model_placement`),
which must see the very graph the INT8 export quantizes; it imports nothing of the pipeline or of quantization.
"""

from __future__ import annotations

import onnx
import torch

from sidnet.graph.onnx_export import export_onnx, module_scopes
from sidnet.graph.surgery import rewrite
from sidnet.graph.wrapper import DeployModel
from sidnet.models import Reorg


def build_graph(
    deploy: DeployModel, *, target: str, precision: str, opset: int
) -> tuple[onnx.ModelProto, onnx.ModelProto, list[str]]:
    """Trace ``deploy`` and run the surgery: (as exported by torch, final graph, surgery log lines)."""
    exported = export_onnx(deploy, opset=opset)
    final, slog = rewrite(
        exported,
        module_scopes(exported),
        target=target,
        reorgs={path: m.stride for path, m in deploy.named_modules() if isinstance(m, Reorg)},
        decode_path="decode",
        decode_attrs=decode_attrs(deploy),
        fp16=precision == "fp16",
    )
    return exported, final, slog.lines


def decode_attrs(deploy: DeployModel) -> dict:
    """The ``sidnet::RegionDecode`` attributes of ``deploy`` (anchors in input pixels, strides, threshold, K)."""
    model = deploy.model
    with torch.no_grad():
        raw = model(torch.zeros(1, 3, model.input_size, model.input_size))
    stride_x, stride_y = deploy.decode.stride(raw)
    return {
        "anchors": [float(v) for v in model.anchors.flatten().tolist()],
        "num_anchors": int(model.anchors.shape[0]),
        "num_classes": model.num_classes,
        "stride_x": float(stride_x),
        "stride_y": float(stride_y),
        "conf_thresh": float(deploy.decode.conf_thresh),
        "topk": int(deploy.decode.topk),
    }
