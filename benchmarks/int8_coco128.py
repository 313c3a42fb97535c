"""INT8 benchmark (CPU): accuracy of PyTorch FP32, ONNX FP32 and ONNX INT8 (per calibration method, and after the
accuracy gate) on coco128 val2017 persons, and onnxruntime CPU throughput INT8 vs FP32 measured in one run.

usage: python benchmarks/int8_coco128.py --checkpoint CKPT [--data conf/data/coco128.yaml] [--out DIR]

Calibration: coco128 train2017 (all images, batches of 8), the deployment preprocessing; statistics are collected
once and each method's amax is computed from them. Evaluation: val2017 (never seen by calibration).
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

from sidnet.data import DetectionDataset
from sidnet.engine.checkpoint import load_checkpoint, model_from_checkpoint
from sidnet.engine.data import load_records
from sidnet.engine.predict import predict_dataset
from sidnet.environment import environment
from sidnet.evaluation import evaluate_detections
from sidnet.export import calibration as calib
from sidnet.export import int8 as q
from sidnet.export.accuracy_gate import evaluate_ap50, fallback_loop
from sidnet.export.config import ExportConfig
from sidnet.export.int8_export import _versions
from sidnet.export.pipeline import run_export
from train.evaluate import load_data_yaml

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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default="conf/data/coco128.yaml")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--work", default="/tmp/int8_bench")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    data = load_data_yaml(Path(args.data))
    val = load_records(data, "val", project_root=ROOT)
    train = load_records(data, "train", project_root=ROOT)
    rows: dict[str, dict] = {}

    state = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(state)
    size = model.input_size
    from sidnet.engine.tasks import build_task

    preds, _ = predict_dataset(model, DetectionDataset(val, size=size), task=build_task(model),
                               device=torch.device("cpu"), batch_size=8)  # fmt: skip
    rep = evaluate_detections(val, preds, operating_conf=0.3)
    rows["PyTorch FP32"] = {k: float(rep[k]) for k in ("AP", "AP50", "recall")}

    cfg = ExportConfig(checkpoint=args.checkpoint, out=str(work / "fp32"), target="native")
    res = run_export(cfg, project_root=ROOT)
    fp32 = onnx.load(str(res.onnx_path))
    rows["ONNX FP32 (onnxruntime)"] = evaluate_ap50(fp32, val)

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
        rows[f"ONNX INT8 PTQ {method}" + (" 99.99" if method == "percentile" else "")] = evaluate_ap50(qdq, val)

    # The gate on the entropy model. NOTE: coco128 has no third split, so the gate's held-out split is val2017,
    # the same images as the table: the gated figure is selected on its own test set (optimistic).
    qdq, cache, scales = models["entropy"]

    def requantize(extra: list[str]) -> onnx.ModelProto:
        return q.quantize_with_modelopt(res.onnx_path, batch=first, exclude=[*exclude, *extra], cache=cache)

    images = np.stack([calib.preprocess(Path(r.path), size) for r in val[:8]])
    gated, gate = fallback_loop(fp32=fp32, qdq=qdq, requantize=requantize, layers=q.quantized_layers(qdq),
                                records=val, images=images, budget=1.0, max_fallback=8)  # fmt: skip
    rows["ONNX INT8 entropy + accuracy gate (budget 1.0)"] = gate["steps"][-1] | {"kept_out": gate["kept_out"]}
    int8_path = work / "int8_entropy.onnx"
    onnx.save(models["entropy"][0], str(int8_path))
    speed = {b: throughput({"fp32": res.onnx_path, "int8": int8_path}, size, batch=b) for b in (1, 8)}

    result = {
        "checkpoint": args.checkpoint,
        "checkpoint_metrics_recorded_on_gpu": state.get("metrics", {}).get("AP50"),
        "environment": environment("cpu"),
        "versions": _versions(),
        "calibration": {"images": len(cset.used), "batches": cset.num_batches, "batch_size": 8,
                        "tensors": len(tensors), "seconds": round(calib_s, 1)},  # fmt: skip
        "eval": {"split": "val2017", "images": len(val)},
        "rows": rows,
        "gate": gate,
        "throughput_img_s": {str(b): v for b, v in speed.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "int8_coco128.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    lines = ["| model | AP | AP50 | recall@0.3 |", "|---|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['AP']:.4f} | {r['AP50']:.4f} | {r['recall']:.4f} |")
    for b, v in speed.items():
        lines.append(f"\nonnxruntime CPU batch {b}: FP32 {v['fp32']:.1f} img/s, INT8 {v['int8']:.1f} img/s, "
                     f"ratio INT8/FP32 {v['int8'] / v['fp32']:.2f}")  # fmt: skip
    print("\n".join(lines))
    (out / "int8_coco128_table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
