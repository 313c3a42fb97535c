"""INT8 benchmark (CPU): accuracy of PyTorch FP32, ONNX FP32, ONNX INT8 PTQ (per calibration method, and after the
accuracy gate) and ONNX INT8 from QAT checkpoints on coco128 val2017 persons, and onnxruntime CPU throughput INT8 vs
FP32 measured in one run.

usage: python benchmarks/int8_coco128.py --checkpoint CKPT [--qat LABEL=QAT_CKPT ...] [--data conf/data/coco128.yaml]
       [--gate-split val:0/2] [--test-split val:1/2] [--out DIR]

Calibration: coco128 train2017 (all images, batches of 8), the deployment preprocessing; statistics are collected
once and each method's amax is computed from them. QAT rows: ``python -m export --precision int8`` of each QAT
checkpoint (its own ranges, no recalibration). Held-out split: the accuracy gate runs on ``--gate-split`` (part of
val2017 by image id) and every row is reported on ``--test-split`` (the other part), never seen by the gate, and on
the full val2017 for continuity with earlier results (there the gated row is optimistic: it saw half of those images).
Each model predicts every val2017 image once; both figures are the one evaluator's on those predictions.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from sidnet.checkpoint import load_checkpoint, model_from_checkpoint
from sidnet.data import DetectionDataset
from sidnet.data.config import load_data_yaml
from sidnet.data.loading import load_records
from sidnet.environment import environment
from sidnet.evaluation import evaluate_detections
from sidnet.evaluation.predict import predict_dataset
from sidnet.export.config import ExportConfig, Int8Config
from sidnet.export.pipeline import run_export
from sidnet.quant import calibration as calib
from sidnet.quant import qdq as q
from sidnet.quant.accuracy_gate import fallback_loop
from sidnet.quant.ptq import _versions

ROOT = Path(__file__).resolve().parents[1]


def throughput(paths: dict[str, Path], size: int, *, batch: int, rounds: int = 5, iters: int = 5) -> dict[str, float]:
    """Images/s per model, rounds interleaved so that both see the same machine load."""
    sessions = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    x = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
    for s in sessions.values():
        s.run(None, {"images": x})
    best = {k: 0.0 for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            t = time.perf_counter()
            for _ in range(iters):
                s.run(None, {"images": x})
            best[k] = max(best[k], batch * iters / (time.perf_counter() - t))
    return best


def score(model, records: list, parts: dict[str, list], *, task=None) -> dict[str, dict]:
    """Predict ``records`` once with ``model`` (torch module, or an ONNX path/model through OnnxDetector), then the one
    evaluator's AP / AP50 / recall@0.3 on each named subset of them."""
    import tempfile

    from sidnet.evaluation.onnx_detector import OnnxDetector

    if isinstance(model, torch.nn.Module):
        preds, _ = predict_dataset(model, DetectionDataset(records, size=model.input_size), task=task,
                                   device=torch.device("cpu"), batch_size=8)  # fmt: skip
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = model if isinstance(model, Path) else Path(tmp) / "model.onnx"
            if not isinstance(model, Path):
                onnx.save(model, str(path))
            det = OnnxDetector(path)
            preds, _ = predict_dataset(det, DetectionDataset(records, size=det.input_size), task=None,
                                       device=torch.device("cpu"), batch_size=8)  # fmt: skip
    out = {}
    for name, subset in parts.items():
        ids = {r.image_id for r in subset}
        rep = evaluate_detections(subset, {i: d for i, d in preds.items() if i in ids}, operating_conf=0.3)
        out[name] = {k: float(rep[k]) for k in ("AP", "AP50", "recall")} | {"images": len(subset)}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--qat", action="append", default=[], metavar="LABEL=CKPT", help="a QAT checkpoint to export")
    p.add_argument("--data", default="conf/data/coco128.yaml")
    p.add_argument("--gate-split", default="val:0/2")
    p.add_argument("--test-split", default="val:1/2")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--work", default="/tmp/int8_bench")
    p.add_argument("--skip-ptq", action="store_true", help="QAT rows only (PTQ rows from an earlier JSON in --out)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    data = load_data_yaml(Path(args.data), project_root=ROOT)
    val = load_records(data, "val", project_root=ROOT)
    gate_records = load_records(data, args.gate_split, project_root=ROOT)
    test = load_records(data, args.test_split, project_root=ROOT)
    assert not {r.image_id for r in gate_records} & {r.image_id for r in test}, "gate and test splits overlap"
    parts = {"test": test, "gate": gate_records, "val": val}
    train = load_records(data, "train", project_root=ROOT)
    rows: dict[str, dict] = {}
    previous = out / "int8_coco128.json"
    if args.skip_ptq:
        rows = json.loads(previous.read_text())["rows"]

    state = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(state)
    size = model.input_size
    cfg = ExportConfig(checkpoint=args.checkpoint, out=str(work / "fp32"), target="native")
    res = run_export(cfg, project_root=ROOT)
    fp32 = onnx.load(str(res.onnx_path))
    gate = calib_s = cset = tensors = None
    if not args.skip_ptq:
        from sidnet.engine.tasks import build_task

        rows["PyTorch FP32"] = score(model, val, parts, task=build_task(model))
        rows["ONNX FP32 (onnxruntime)"] = score(fp32, val, parts)

        exclude = q.head_and_decode_nodes(fp32)
        cset = calib.CalibrationSet([r.path for r in train], size=size, batch_size=8, batches=1000)
        first = next(iter(calib.CalibrationSet(cset.paths[:8], size=size, batch_size=8)))
        probe = q.quantize_with_modelopt(res.onnx_path, batch=first, exclude=exclude)
        tensors = list(q.activation_scales(probe))
        t0 = time.perf_counter()
        stats = calib.collect_statistics(fp32.SerializeToString(), tensors, cset)
        calib_s = time.perf_counter() - t0
        models = {}
        for method in calib.METHODS:
            amax = calib.activation_amax(stats, method=method)
            scales = {t: max(a, 1e-8) / 127.0 for t, a in amax.items()}
            cache = work / f"{method}.cache"
            cache.write_text(calib.cache_text(scales, method=method, trt_version="100100"))
            qdq = q.quantize_with_modelopt(res.onnx_path, batch=first, exclude=exclude, cache=cache)
            q.check_cache_applied(qdq, scales)
            models[method] = (qdq, cache, scales)
            rows[f"ONNX INT8 PTQ {method}" + (" 99.99" if method == "percentile" else "")] = score(qdq, val, parts)

        # The gate on the entropy model, on the gate split only; the gated model is then scored like every row.
        qdq, cache, scales = models["entropy"]

        def requantize(extra: list[str]) -> onnx.ModelProto:
            return q.quantize_with_modelopt(res.onnx_path, batch=first, exclude=[*exclude, *extra], cache=cache)

        images = np.stack([calib.preprocess(Path(r.path), size) for r in gate_records[:8]])
        gated, gate = fallback_loop(fp32=fp32, qdq=qdq, requantize=requantize, layers=q.quantized_layers(qdq),
                                    records=gate_records, images=images, budget=1.0, max_fallback=8)  # fmt: skip
        rows["ONNX INT8 PTQ entropy + accuracy gate (budget 1.0)"] = score(gated, val, parts) | {
            "kept_out": gate["kept_out"],
            "gate_split": args.gate_split,
        }
        int8_path = work / "int8_entropy.onnx"
        onnx.save(models["entropy"][0], str(int8_path))
        speed = {b: throughput({"fp32": res.onnx_path, "int8": int8_path}, size, batch=b) for b in (1, 8)}

    qat_info = json.loads(previous.read_text()).get("qat", {}) if args.skip_ptq else {}
    for spec in args.qat:
        label, _, ckpt = spec.partition("=")
        cfg = ExportConfig(checkpoint=ckpt, out=str(work / f"qat_{label}"), target="native", precision="int8",
                           force=True, int8=Int8Config(gate_data=args.data, gate_split=args.gate_split,
                                                       max_fallback=0))  # fmt: skip
        qres = run_export(cfg, project_root=ROOT)
        qstate = load_checkpoint(ckpt)
        qat_info[label] = {"checkpoint": ckpt, "epochs": qstate["epoch"], "config": {
            k: qstate["config"][k] for k in ("optim", "quant", "batch_size", "epochs")},
            "history": qstate["history"], "gate_split_record": qres.report["int8"]["accuracy_gate"]}  # fmt: skip
        rows[f"ONNX INT8 QAT {label}"] = score(qres.onnx_path, val, parts)

    result = json.loads(previous.read_text()) if args.skip_ptq else {
        "checkpoint": args.checkpoint,
        "environment": environment("cpu"),
        "versions": _versions(),
        "calibration": {"images": len(cset.used), "batches": cset.num_batches, "batch_size": 8,
                        "tensors": len(tensors), "seconds": round(calib_s, 1)},  # fmt: skip
        "gate": gate,
        "throughput_img_s": {str(b): v for b, v in speed.items()},
    }  # fmt: skip
    result.update({"eval": {"test": f"{args.test_split} ({len(test)} images)", "val": f"val ({len(val)} images)",
                            "gate": f"{args.gate_split} ({len(gate_records)} images)"},
                   "rows": rows, "qat": qat_info, "qat_environment": environment("cpu")})  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    previous.write_text(json.dumps(result, indent=2, default=str) + "\n")
    ref = rows["ONNX FP32 (onnxruntime)"]
    lines = [f"test = {args.test_split}, gate = {args.gate_split} (the gate selects on it), val = all of val; "
             "Δ = AP50 minus ONNX FP32's on the same images, in points", "",
             "| model | test AP | test AP50 | test Δ | test recall@0.3 | gate AP50 | gate Δ | val AP | val AP50 "
             "| val Δ | val recall@0.3 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, r in rows.items():
        t, g, v = r["test"], r["gate"], r["val"]
        d = {k: 100 * (r[k]["AP50"] - ref[k]["AP50"]) for k in ("test", "gate", "val")}
        lines.append(f"| {name} | {t['AP']:.4f} | {t['AP50']:.4f} | {d['test']:+.2f} | {t['recall']:.4f} | "
                     f"{g['AP50']:.4f} | {d['gate']:+.2f} | {v['AP']:.4f} | {v['AP50']:.4f} | {d['val']:+.2f} | "
                     f"{v['recall']:.4f} |")  # fmt: skip
    for b, v in result["throughput_img_s"].items():
        lines.append(f"\nonnxruntime CPU batch {b}: FP32 {v['fp32']:.1f} img/s, INT8 {v['int8']:.1f} img/s, "
                     f"ratio INT8/FP32 {v['int8'] / v['fp32']:.2f}")  # fmt: skip
    print("\n".join(lines))
    (out / "int8_coco128_table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
