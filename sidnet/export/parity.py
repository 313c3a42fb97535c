"""Run an exported ONNX graph on random images and compare it with the PyTorch reference.

The reference is the model's own head (``raw``) and :func:`sidnet.models.region.region_topk`, the semantics the
kernels implement, not the traced wrapper. Graphs with ``sidnet::`` plugin nodes run in ``onnx.reference`` with the
NumPy ops of :mod:`sidnet.export.reference_ops`; standard graphs run in onnxruntime (CPU).

Detections are compared row by row after matching each reference row to the output row of nearest box among rows
whose score is within the score tolerance: two near-equal scores may come out in either order when two runtimes
round differently, which is not an error. ``num_detections`` may differ only by rows that sit within the score
tolerance of the threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch

from sidnet.export.wrapper import INPUT_NAME, OUTPUT_NAMES, RAW_NAME, DeployModel
from sidnet.models.region import region_topk


@dataclass
class ParityResult:
    runtime: str
    batches: list[int]
    tolerance: dict[str, float]
    max_abs: dict[str, float] = field(default_factory=dict)  # raw, boxes (input pixels), score
    class_mismatches: int = 0
    num_mismatches: int = 0
    padding_nonzero: int = 0  # rows after num_detections that are not all zero
    detections_compared: int = 0

    @property
    def passed(self) -> bool:
        within = all(self.max_abs.get(k, 0.0) <= v for k, v in self.tolerance.items())
        return within and not (self.class_mismatches or self.num_mismatches or self.padding_nonzero)

    def summary(self) -> str:
        diffs = ", ".join(f"{k} {self.max_abs.get(k, 0.0):.3g} (tol {v:g})" for k, v in self.tolerance.items())
        return (f"{self.runtime} vs PyTorch, batches {self.batches}: max |diff| {diffs}; "
                f"{self.detections_compared} detections, class mismatches {self.class_mismatches}, num mismatches "
                f"{self.num_mismatches}, nonzero padding rows {self.padding_nonzero} -> "
                f"{'PASS' if self.passed else 'FAIL'}")  # fmt: skip

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def uses_custom_ops(model: onnx.ModelProto) -> bool:
    return any(n.domain not in ("", "ai.onnx") for n in model.graph.node)


def with_raw_output(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the head map ``raw`` (float32)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if RAW_NAME not in {o.name for o in out.graph.output}:
        out.graph.output.append(onnx.helper.make_tensor_value_info(RAW_NAME, onnx.TensorProto.FLOAT, None))
    return out


def run_onnx(model: onnx.ModelProto, images: np.ndarray, names: list[str]) -> tuple[list[np.ndarray], str]:
    """Run ``model`` on ``images``; returns the named outputs and the runtime's name."""
    if uses_custom_ops(model):
        from onnx.reference import ReferenceEvaluator

        from sidnet.export.reference_ops import REFERENCE_OPS

        return ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(names, {INPUT_NAME: images}), "onnx.reference"
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, {INPUT_NAME: images}), f"onnxruntime {ort.__version__}"


def _compare_image(ref_d, ref_n, out_d, out_n, *, conf_thresh: float, score_tol: float, acc: dict) -> None:
    k = min(ref_n, out_n)
    longer = ref_d[k:ref_n] if ref_n > out_n else out_d[k:out_n]
    if (longer[:, 4] >= conf_thresh + score_tol).any():
        acc["num"] += 1
    acc["padding"] += int(np.abs(out_d[out_n:]).sum(axis=1).astype(bool).sum())
    if k == 0:
        return
    r, o = ref_d[:k].astype(np.float64), out_d[:k].astype(np.float64)
    box = np.abs(r[:, None, :4] - o[None, :, :4]).max(axis=-1)  # (k, k): box distance of every pair
    near = np.abs(r[:, None, 4] - o[None, :, 4]) <= score_tol
    np.fill_diagonal(near, True)  # the same rank is always a candidate
    j = np.where(near, box, np.inf).argmin(axis=1)
    acc["boxes"] = max(acc["boxes"], float(box[np.arange(k), j].max()))
    acc["score"] = max(acc["score"], float(np.abs(r[:, 4] - o[j, 4]).max()))
    acc["cls"] += int((r[:, 5] != o[j, 5]).sum())
    acc["rows"] += k


def check_parity(
    deploy: DeployModel, model: onnx.ModelProto, *, batches: list[int], seed: int, tolerance: dict[str, float]
) -> ParityResult:
    """Random [0, 1] images of each batch size through ``model`` and through PyTorch; see the module docstring."""
    deploy = deploy.eval()
    size, decode = deploy.model.input_size, deploy.decode
    probe = with_raw_output(model)
    gen = torch.Generator().manual_seed(seed)
    acc = {"raw": 0.0, "boxes": 0.0, "score": 0.0, "cls": 0, "num": 0, "padding": 0, "rows": 0}
    runtime = ""
    for n in batches:
        images = torch.rand(n, 3, size, size, generator=gen)
        with torch.no_grad():
            raw = deploy.model(images).float()
            ref_d, ref_n = region_topk(raw, decode.anchors, stride=decode.stride(raw), conf_thresh=decode.conf_thresh,
                                       topk=decode.topk)  # fmt: skip
        (out_d, out_n, out_raw), runtime = run_onnx(probe, images.numpy(), [*OUTPUT_NAMES, RAW_NAME])
        acc["raw"] = max(acc["raw"], float(np.abs(out_raw.astype(np.float64) - raw.numpy()).max()))
        for i in range(n):
            _compare_image(ref_d[i].numpy(), int(ref_n[i]), out_d[i], int(out_n[i]), conf_thresh=decode.conf_thresh,
                           score_tol=tolerance["score"], acc=acc)  # fmt: skip
    return ParityResult(
        runtime=runtime, batches=list(batches), tolerance=dict(tolerance),
        max_abs={k: acc[k] for k in ("raw", "boxes", "score")}, class_mismatches=acc["cls"],
        num_mismatches=acc["num"], padding_nonzero=acc["padding"], detections_compared=acc["rows"],
    )  # fmt: skip
