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

from sidnet.graph.wrapper import INPUT_NAME, OUTPUT_NAMES, RAW_NAME, DeployModel
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
    boundary_ties: int = 0  # rows tied with the last kept score that only one side kept (see _compare_image)

    @property
    def passed(self) -> bool:
        within = all(self.max_abs.get(k, 0.0) <= v for k, v in self.tolerance.items())
        return within and not (self.class_mismatches or self.num_mismatches or self.padding_nonzero)

    def summary(self) -> str:
        diffs = ", ".join(f"{k} {self.max_abs.get(k, 0.0):.3g} (tol {v:g})" for k, v in self.tolerance.items())
        return (
            f"{self.runtime} vs PyTorch, batches {self.batches}: max |diff| {diffs}; "
            f"{self.detections_compared} detections matched ({self.boundary_ties} boundary ties skipped), "
            f"class mismatches {self.class_mismatches}, num mismatches "
            f"{self.num_mismatches}, nonzero padding rows {self.padding_nonzero} -> "
            f"{'PASS' if self.passed else 'FAIL'}"
        )

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


def _torch_ops() -> list[type]:
    """2-D ``Conv`` and ``MaxPool`` for ``onnx.reference``, computed by torch (float32 math, the input's dtype out).

    The NumPy reference versions need ~10 s per 416x416 image in float32 and minutes in float16; the check is about the
    ``sidnet::`` ops, not about convolution or pooling, so the body runs on torch's kernels instead.
    """
    from onnx.reference.op_run import OpRun

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32))  # a writable float32 copy

    def padded(x: np.ndarray, pads, auto_pad, value: float) -> torch.Tensor:
        if x.ndim != 4 or auto_pad not in (None, "NOTSET", b"NOTSET"):
            raise NotImplementedError(f"parity ops: 2-D with explicit pads only, got {x.ndim - 2}-D, {auto_pad}")
        t, (top, left, bottom, right) = tensor(x), pads or (0, 0, 0, 0)
        return torch.nn.functional.pad(t, (left, right, top, bottom), value=value)

    class Conv(OpRun):
        def _run(self, x, w, b=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None,
                 strides=None):  # fmt: skip
            y = torch.nn.functional.conv2d(padded(x, pads, auto_pad, 0.0), tensor(w), None if b is None else tensor(b),
                                           stride=tuple(strides or (1, 1)), dilation=tuple(dilations or (1, 1)),
                                           groups=group or 1)  # fmt: skip
            return (y.numpy().astype(x.dtype),)

    class MaxPool(OpRun):
        def _run(self, x, auto_pad=None, ceil_mode=0, dilations=None, kernel_shape=None, pads=None, storage_order=0,
                 strides=None):  # fmt: skip
            y = torch.nn.functional.max_pool2d(padded(x, pads, auto_pad, float("-inf")), tuple(kernel_shape),
                                               stride=tuple(strides or (1, 1)), dilation=tuple(dilations or (1, 1)),
                                               ceil_mode=bool(ceil_mode))  # fmt: skip
            return (y.numpy().astype(x.dtype),)

    class ConvTranspose(OpRun):
        def _run(self, x, w, b=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, output_padding=None,
                 output_shape=None, pads=None, strides=None):  # fmt: skip
            if x.ndim != 4 or output_shape is not None or auto_pad not in (None, "NOTSET", b"NOTSET"):
                raise NotImplementedError("parity ops: 2-D ConvTranspose with explicit pads only")
            top, left, bottom, right = pads or (0, 0, 0, 0)
            if (top, left) != (bottom, right):
                raise NotImplementedError(f"parity ops: asymmetric ConvTranspose pads {pads}")
            y = torch.nn.functional.conv_transpose2d(tensor(x), tensor(w), None if b is None else tensor(b),
                                                     stride=tuple(strides or (1, 1)), padding=(top, left),
                                                     output_padding=tuple(output_padding or (0, 0)),
                                                     groups=group or 1,
                                                     dilation=tuple(dilations or (1, 1)))  # fmt: skip
            return (y.numpy().astype(x.dtype),)

    class GatherElements(OpRun):  # onnx.reference's np.choose version takes at most 64 entries along the axis
        def _run(self, data, indices, axis=None):
            idx = torch.from_numpy(np.array(indices, dtype=np.int64))
            axis = axis or 0
            idx = torch.where(idx < 0, idx + data.shape[axis], idx)
            return (torch.gather(torch.from_numpy(np.array(data)), axis, idx).numpy(),)

    class NonMaxSuppression(OpRun):  # onnx.reference's indexes a scalar max_output_boxes_per_class and fails
        def _run(self, boxes, scores, max_out=None, iou=None, score_thresh=None, center_point_box=0):
            import torchvision

            if center_point_box:
                raise NotImplementedError("parity ops: NonMaxSuppression with center_point_box=1")
            limit = int(np.asarray(max_out).reshape(-1)[0]) if max_out is not None and np.size(max_out) else 0
            thr = float(np.asarray(iou).reshape(-1)[0]) if iou is not None and np.size(iou) else 0.0
            rows = []
            for b in range(boxes.shape[0]):
                bx = torch.from_numpy(np.array(boxes[b], dtype=np.float32))
                bx = torch.cat([bx[:, :2].minimum(bx[:, 2:]), bx[:, :2].maximum(bx[:, 2:])], 1)  # corners any order
                for c in range(scores.shape[1]):
                    sc = torch.from_numpy(np.array(scores[b, c], dtype=np.float32))
                    idx = torch.arange(len(sc))
                    if score_thresh is not None and np.size(score_thresh):
                        idx = idx[sc > float(np.asarray(score_thresh).reshape(-1)[0])]
                    keep = idx[torchvision.ops.nms(bx[idx], sc[idx], thr)][:limit]
                    rows += [[b, c, int(k)] for k in keep]
            return (np.asarray(rows, dtype=np.int64).reshape(-1, 3),)

    return [Conv, MaxPool, ConvTranspose, GatherElements, NonMaxSuppression]


def run_onnx(model: onnx.ModelProto, images: np.ndarray, names: list[str]) -> tuple[list[np.ndarray], str]:
    """Run ``model`` on ``images``; returns the named outputs and the runtime's name."""
    if uses_custom_ops(model):
        from onnx.reference import ReferenceEvaluator

        from sidnet.export.reference_ops import REFERENCE_OPS

        evaluator = ReferenceEvaluator(model, new_ops=[*REFERENCE_OPS, *_torch_ops()])
        by_torch = "Conv, ConvTranspose, MaxPool, GatherElements, NonMaxSuppression by torch"
        return evaluator.run(names, {INPUT_NAME: images}), f"onnx.reference ({by_torch})"
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, {INPUT_NAME: images}), f"onnxruntime {ort.__version__}"


def _compare_image(ref_d, ref_n, out_d, out_n, *, conf_thresh: float, tol: dict[str, float], acc: dict) -> None:
    k = min(ref_n, out_n)
    longer = ref_d[k:ref_n] if ref_n > out_n else out_d[k:out_n]
    if (longer[:, 4] >= conf_thresh + tol["score"]).any():
        acc["num"] += 1
    acc["padding"] += int(np.abs(out_d[out_n:]).sum(axis=1).astype(bool).sum())
    if k == 0:
        return
    r, o = ref_d[:k].astype(np.float64), out_d[:k].astype(np.float64)
    box = np.abs(r[:, None, :4] - o[None, :, :4]).max(axis=-1)  # (k, k): box distance of every pair
    near = np.abs(r[:, None, 4] - o[None, :, 4]) <= tol["score"]
    np.fill_diagonal(near, True)  # the same rank is always a candidate
    j = np.where(near, box, np.inf).argmin(axis=1)
    best = box[np.arange(k), j]
    # A row tied (within the score tolerance) with the last kept score may be cut by one runtime and kept by the
    # other: membership at the top-K / threshold boundary is ambiguous, not wrong. Such unmatched rows are skipped.
    boundary = min(r[k - 1, 4], o[k - 1, 4])
    skip = (best > tol["boxes"]) & (np.abs(r[:, 4] - boundary) <= tol["score"])
    acc["boundary"] += int(skip.sum())
    keep = ~skip
    if keep.any():
        acc["boxes"] = max(acc["boxes"], float(best[keep].max()))
        acc["score"] = max(acc["score"], float(np.abs(r[keep, 4] - o[j[keep], 4]).max()))
        acc["cls"] += int((r[keep, 5] != o[j[keep], 5]).sum())
    acc["rows"] += int(keep.sum())


def check_parity(
    deploy: DeployModel, model: onnx.ModelProto, *, batches: list[int], seed: int, tolerance: dict[str, float]
) -> ParityResult:
    """Random [0, 1] images of each batch size through ``model`` and through PyTorch; see the module docstring."""
    deploy = deploy.eval()
    size, decode = deploy.model.input_size, deploy.decode
    probe = with_raw_output(model)
    gen = torch.Generator().manual_seed(seed)
    acc = {"raw": 0.0, "boxes": 0.0, "score": 0.0, "cls": 0, "num": 0, "padding": 0, "rows": 0, "boundary": 0}
    runtime = "not run (parity.batches is empty)"
    for n in batches:
        images = torch.rand(n, 3, size, size, generator=gen)
        with torch.no_grad():
            raw = deploy.model(images).float()
            ref_d, ref_n = region_topk(
                raw, decode.anchors, stride=decode.stride(raw), conf_thresh=decode.conf_thresh, topk=decode.topk
            )
        (out_d, out_n, out_raw), runtime = run_onnx(probe, images.numpy(), [*OUTPUT_NAMES, RAW_NAME])
        acc["raw"] = max(acc["raw"], float(np.abs(out_raw.astype(np.float64) - raw.numpy()).max()))
        for i in range(n):
            _compare_image(
                ref_d[i].numpy(),
                int(ref_n[i]),
                out_d[i],
                int(out_n[i]),
                conf_thresh=decode.conf_thresh,
                tol=tolerance,
                acc=acc,
            )
    return ParityResult(
        runtime=runtime,
        batches=list(batches),
        tolerance=dict(tolerance),
        max_abs={k: acc[k] for k in ("raw", "boxes", "score")},
        class_mismatches=acc["cls"],
        num_mismatches=acc["num"],
        padding_nonzero=acc["padding"],
        detections_compared=acc["rows"],
        boundary_ties=acc["boundary"],
    )
