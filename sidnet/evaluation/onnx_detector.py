"""An exported SIDNet ONNX (FP32, FP16 or INT8 Q/DQ, native target) or Mask R-CNN ONNX run by onnxruntime's CPU
provider, as an :class:`~sidnet.evaluation.predict.ExportedPredictor`, so one evaluator compares every artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.ops import batched_nms

from sidnet.evaluation.predict import ExportedPredictor
from sidnet.graph.wrapper import INPUT_NAME, OUTPUT_NAMES
from sidnet.safety import check_input_size, load_onnx, parse_json


class OnnxDetector(ExportedPredictor):
    """``detect(images)`` → per-image ``(P, 6)`` float32 ``[x1, y1, x2, y2, score, class]`` in input pixels.

    The graph already thresholds (its ``conf_thresh``) and keeps the top-K rows; ``detect`` applies the evaluator's
    class-wise NMS to them (the graph has none), like :func:`sidnet.postprocess.postprocess` does for PyTorch.
    Differences from the PyTorch path: top-K happens before NMS here, after it there (K = the graph's ``topk``).

    A Mask R-CNN export (a ``masks`` output; static batch, NMS inside the graph as in the PyTorch model): no second
    NMS, and :meth:`predict` adds ``masks`` (P, S, S) probabilities pasted like torchvision's eval
    (:func:`sidnet.data.masks.paste_masks`); ``iou_types`` is then ``("bbox", "segm")``.
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
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.has_masks = "masks" in self.outputs
        self.iou_types = ("bbox", "segm") if self.has_masks else ("bbox",)
        batch = self.session.get_inputs()[0].shape[0]
        self.batch = batch if isinstance(batch, int) else None  # a static batch (Mask R-CNN: 1) is run in chunks

    def _run(self, images: torch.Tensor) -> list[np.ndarray]:
        x = images.cpu().numpy().astype(np.float32)
        step = self.batch or len(x) or 1
        chunks = [self.session.run(None, {INPUT_NAME: x[i : i + step]}) for i in range(0, len(x), step)]
        return [np.concatenate([c[k] for c in chunks]) for k in range(len(self.outputs))]

    def detect(self, images: torch.Tensor, *, nms_iou: float = 0.45, max_det: int = 100) -> list[torch.Tensor]:
        return [d for d, _ in self._rows(images, nms_iou=nms_iou, max_det=max_det)]

    def _rows(self, images, *, nms_iou, max_det) -> list[tuple[torch.Tensor, np.ndarray | None]]:
        """Per image: (rows (P, 6) after NMS, their (P, M, M) mask rows or None)."""
        outs = dict(zip(self.outputs, self._run(images), strict=True))
        masks = outs.get("masks")
        result = []
        for i, (d, n) in enumerate(zip(outs[OUTPUT_NAMES[0]], outs[OUTPUT_NAMES[1]], strict=True)):
            d = torch.from_numpy(np.ascontiguousarray(d[: int(n)]))
            if self.has_masks:  # NMS is inside the Mask R-CNN graph, as in the PyTorch model
                keep = torch.arange(len(d))[:max_det]
            else:
                keep = batched_nms(d[:, :4], d[:, 4], d[:, 5].long(), nms_iou)[:max_det]
            result.append((d[keep], None if masks is None else masks[i][keep.numpy()]))
        return result

    def predict(self, images: torch.Tensor, *, conf_thresh: float, nms_iou: float,
                max_det: int) -> list[dict[str, torch.Tensor]]:  # fmt: skip
        from sidnet.data.masks import paste_masks

        out = []
        for d, m in self._rows(images, nms_iou=nms_iou, max_det=max_det):
            ok = d[:, 4] >= conf_thresh
            d = d[ok]
            p = {"boxes": d[:, :4], "scores": d[:, 4], "labels": d[:, 5].long()}
            if m is not None:
                p["masks"] = torch.from_numpy(paste_masks(m[ok.numpy()], d[:, :4].numpy(), size=self.input_size))
            out.append(p)
        return out
