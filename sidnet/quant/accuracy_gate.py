"""The INT8 accuracy gate: AP50 of the FP32 and the INT8 graph on a held-out split, per-layer sensitivity, fallback.

Sensitivity is measured in one pass: both graphs run on a few held-out images with every quantized layer's output
exposed; a layer's score is the relative noise it *adds*, ``||y_int8 - y_fp32||² / ||y_fp32||²`` of its output minus
the same for its (already noisy) activation input. A layer whose input range is dominated by one outlier channel
scores high, wherever it sits. The fallback moves the highest-scoring layer out of INT8 (its input Q/DQ removed,
weights FP32), re-quantizes from the same calibration cache (no recalibration) and measures AP50 again, until the
drop is within the budget or ``max_fallback`` layers are out. Every step is recorded.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from sidnet.graph.wrapper import INPUT_NAME

log = logging.getLogger("sidnet.quant.qdq")


def evaluate_ap50(model: onnx.ModelProto, records: Sequence, *, batch_size: int = 8) -> dict:
    """AP / AP50 / recall@0.3 of an ONNX graph on ``records`` through the project's one evaluator."""
    from sidnet.data import DetectionDataset
    from sidnet.evaluation import evaluate_detections
    from sidnet.evaluation.onnx_detector import OnnxDetector
    from sidnet.evaluation.predict import predict_dataset

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(model, str(path))
        detector = OnnxDetector(path)
        preds, _ = predict_dataset(
            detector, DetectionDataset(records, size=detector.input_size), task=None, device=torch.device("cpu"),
            batch_size=batch_size,
        )  # fmt: skip
    report = evaluate_detections(records, preds, operating_conf=0.3)
    return {k: float(report[k]) for k in ("AP", "AP50", "recall")}


def _session(model: onnx.ModelProto, outputs: list[str]):
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.ClearField("output")
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in outputs)
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def layer_sensitivity(fp32: onnx.ModelProto, qdq: onnx.ModelProto, layers: Sequence[str], images: np.ndarray) -> list:
    """``[(layer, added relative noise, output rel. noise, input rel. noise)]``, most sensitive first."""
    nodes = {n.name: n for n in qdq.graph.node}
    fp32_tensors = {o for n in fp32.graph.node for o in n.output} | {INPUT_NAME}
    dq_src = {n.output[0]: n.input[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    q_src = {n.output[0]: n.input[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    rows, wanted = [], []
    for name in layers:
        node = nodes[name]
        act_in = [q_src[dq_src[i]] for i in node.input if i in dq_src and dq_src[i] in q_src]
        act_in = [t for t in act_in if t in fp32_tensors]
        out = node.output[0]
        if out in fp32_tensors:
            rows.append((name, out, act_in))
            wanted += [out, *act_in]
    wanted = list(dict.fromkeys(wanted))
    ref = dict(zip(wanted, _session(fp32, wanted).run(wanted, {INPUT_NAME: images}), strict=True))
    got = dict(zip(wanted, _session(qdq, wanted).run(wanted, {INPUT_NAME: images}), strict=True))

    def noise(t: str) -> float:
        r = ref[t].astype(np.float64)
        return float(((got[t] - r) ** 2).sum() / max((r**2).sum(), 1e-30))

    scored = []
    for name, out, act_in in rows:
        n_out = noise(out)
        n_in = max((noise(t) for t in act_in), default=0.0)
        scored.append((name, n_out - n_in, n_out, n_in))
    return sorted(scored, key=lambda r: -r[1])


def fallback_loop(
    *,
    fp32: onnx.ModelProto,
    qdq: onnx.ModelProto,
    requantize: Callable[[list[str]], onnx.ModelProto],
    layers: Sequence[str],
    records: Sequence,
    images: np.ndarray,
    budget: float,
    max_fallback: int,
) -> tuple[onnx.ModelProto, dict]:
    """Run the gate; returns the accepted Q/DQ model and the record (AP50s, ranking, steps, layers kept out).

    ``budget`` is in AP50 points (1.0 = 0.01 AP50). ``requantize(excluded)`` rebuilds the Q/DQ model with the given
    extra nodes out of INT8, from the same calibration cache.
    """
    ref = evaluate_ap50(fp32, records)
    cur = evaluate_ap50(qdq, records)
    steps = [{"excluded": [], **cur, "drop_points": 100 * (ref["AP50"] - cur["AP50"])}]
    log.info("accuracy gate: FP32 AP50 %.4f, INT8 AP50 %.4f (drop %.2f points, budget %.2f)",
             ref["AP50"], cur["AP50"], steps[0]["drop_points"], budget)  # fmt: skip
    record = {"images": len(records), "budget_points": budget, "fp32": ref, "steps": steps, "ranking": [],
              "kept_out": [], "passed": steps[0]["drop_points"] <= budget}  # fmt: skip
    if record["passed"] or max_fallback <= 0:
        return qdq, record
    ranking = layer_sensitivity(fp32, qdq, layers, images)
    record["ranking"] = [{"layer": n, "added_noise": a, "output_noise": o, "input_noise": i} for n, a, o, i in ranking]
    log.info("sensitivity (top 5): %s", ", ".join(f"{n} {a:.3g}" for n, a, _, _ in ranking[:5]))
    excluded: list[str] = []
    for name, *_ in ranking[:max_fallback]:
        excluded.append(name)
        qdq = requantize(list(excluded))
        cur = evaluate_ap50(qdq, records)
        drop = 100 * (ref["AP50"] - cur["AP50"])
        steps.append({"excluded": list(excluded), **cur, "drop_points": drop})
        log.info("fallback: %d layer(s) out of INT8 (+%s): AP50 %.4f, drop %.2f points", len(excluded), name,
                 cur["AP50"], drop)  # fmt: skip
        if drop <= budget:
            record["passed"] = True
            break
    record["kept_out"] = excluded
    if not record["passed"]:
        log.warning("accuracy gate: still %.2f AP50 points below FP32 after %d fallback(s)", drop, len(excluded))
    return qdq, record
