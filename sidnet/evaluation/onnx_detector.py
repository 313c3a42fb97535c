"""An exported SIDNet ONNX (FP32, FP16 or INT8 Q/DQ, native target) run by onnxruntime's CPU provider, behind the
same ``detect`` contract the evaluator uses for PyTorch models, so one evaluator compares every artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.ops import batched_nms

from sidnet.graph.wrapper import INPUT_NAME, OUTPUT_NAMES
from sidnet.safety import check_input_size, load_onnx, parse_json


class OnnxDetector:
    """``detect(images)`` → per-image ``(P, 6)`` float32 ``[x1, y1, x2, y2, score, class]`` in input pixels.

    The graph already thresholds (its ``conf_thresh``) and keeps the top-K rows; ``detect`` applies the evaluator's
    class-wise NMS to them (the graph has none), like :func:`sidnet.postprocess.postprocess` does for PyTorch.
    Differences from the PyTorch path: top-K happens before NMS here, after it there (K = the graph's ``topk``).
    """

    def __init__(self, path: str | Path, *, threads: int = 0) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        model = load_onnx(self.path)
        self.metadata = {p.key: p.value for p in model.metadata_props}
        if any(n.domain == "sidnet" for n in model.graph.node):
            raise ValueError(f"{self.path} has sidnet:: plugin nodes (plugins target): evaluate the native export")
        raw = self.metadata.get("input_size")  # absent in the INT8 gate's intermediate graphs: their input shape
        size = (parse_json(raw, what=f"{self.path} metadata input_size", fix="re-export it") if raw is not None
                else model.graph.input[0].type.tensor_type.shape.dim[2].dim_value)  # fmt: skip
        self.input_size = check_input_size(size, where=f"metadata of {self.path}", fix="re-export it")
        self.precision = self.metadata.get("precision", "unknown")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def detect(self, images: torch.Tensor, *, nms_iou: float = 0.45, max_det: int = 100) -> list[torch.Tensor]:
        dets, nums = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.cpu().numpy().astype(np.float32)})
        out = []
        for d, n in zip(dets, nums, strict=True):
            d = torch.from_numpy(np.ascontiguousarray(d[: int(n)]))
            keep = batched_nms(d[:, :4], d[:, 4], d[:, 5].long(), nms_iou)[:max_det]
            out.append(d[keep])
        return out
