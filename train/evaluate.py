"""``python -m train.evaluate --checkpoint runs/<name>/best.pt``: COCO AP/AP50/AP75/AP_small for persons, recall and
precision at confidence 0.3, false positives per person-free image (and COCO segm AP for Mask R-CNN when the data
has masks); writes a JSON report.

The data defaults to the checkpoint's own validation split; ``--data conf/data/<x>.yaml`` evaluates elsewhere.
``--onnx model.onnx --data conf/data/<x>.yaml`` evaluates an exported ONNX (FP32, FP16 or INT8 Q/DQ, native target)
in onnxruntime through the same evaluator and report; an INT8 model is checked against its provenance manifest first.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from sidnet.cli import OneLineParser, positive_int, run_guarded, unit_interval
from sidnet.data.config import data_config, load_data_yaml
from sidnet.safety import check_output_file

# torch and the data pipeline are imported where used: a mistyped flag is answered in a fraction of a second.

PROJECT_ROOT = Path(__file__).resolve().parents[1]
KEYS = ("AP", "AP50", "AP75", "AP_small", "recall", "precision", "fp_per_negative_image", "segm_AP", "segm_AP50")


def main(argv: list[str] | None = None) -> dict:
    p = OneLineParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0]).add_verbose()
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", type=Path, help="a .pt written by python -m train")
    what.add_argument("--onnx", type=Path, help="an exported .onnx (native target), run by onnxruntime (needs --data)")
    p.add_argument("--data", type=Path, help="data YAML (default: the checkpoint's data config)")
    p.add_argument("--split", default="val", help="train | val, or part K of N of one by image id: val:1/2")
    p.add_argument("--conf", type=unit_interval, default=0.3, help="operating confidence in (0, 1] for recall/"
                   "precision/FP")  # fmt: skip
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw weights instead of the EMA")
    p.add_argument("--boxes-only", action="store_true", help="Mask R-CNN: box metrics only (data without masks)")
    p.add_argument("--out", type=Path, help="JSON report (default: next to the checkpoint)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip
    stopped = "evaluation interrupted: no report was written (it is written whole at the end); run it again"
    return run_guarded(lambda: evaluate_onnx(args) if args.onnx is not None else evaluate(args), verbose=args.verbose,
                       interrupted=stopped)  # fmt: skip


def evaluate(args: argparse.Namespace) -> dict:
    import torch

    from sidnet.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
    from sidnet.data.loading import load_records
    from sidnet.engine.tasks import build_task
    from sidnet.engine.trainer import resolve_device
    from sidnet.environment import environment

    state = load_checkpoint(args.checkpoint)
    if state.get("quant"):  # QAT: the fake-quantized model, as trained
        from sidnet.quant.qat import fake_quant_model

        model = fake_quant_model(state, ema=not args.no_ema)
    else:
        model = model_from_checkpoint(state, ema=not args.no_ema)
    if args.data is not None:
        if not args.data.exists():
            raise FileNotFoundError(f"data config not found: {args.data}; pass a YAML from conf/data/")
        data = load_data_yaml(args.data, project_root=PROJECT_ROOT)
    else:
        recorded = state.get("config", {}).get("data") if isinstance(state.get("config"), dict) else None
        try:
            data = data_config(recorded)
        except (KeyError, TypeError) as e:  # none, or one this version cannot read
            raise CheckpointError(f"{args.checkpoint} records no usable data config ({type(e).__name__}: {e}); pass "
                                  "--data conf/data/<x>.yaml") from e  # fmt: skip
    task = build_task(model)
    masks = "segm" in task.iou_types and not args.boxes_only
    records = load_records(data, args.split, project_root=PROJECT_ROOT, masks=masks)
    device = resolve_device(args.device)
    model = model.to(device)
    extra = {"checkpoint": str(args.checkpoint), "model": state["model"]["name"], "epoch": state.get("epoch"),
             "input_size": state["model"]["input_size"], "split": args.split, "fake_quant": bool(state.get("quant")),
             **environment(device),
             "versions": {"torch": torch.__version__}}  # fmt: skip
    return _evaluate(model, records, args, size=state["model"]["input_size"], device=device, source=args.checkpoint,
                     extra=extra, task=task, masks=masks)  # fmt: skip


def evaluate_onnx(args: argparse.Namespace) -> dict:
    """The ``--onnx`` path: same records, same predict/evaluate, onnxruntime instead of PyTorch."""
    import onnxruntime
    import torch

    from sidnet.data.loading import load_records
    from sidnet.environment import environment
    from sidnet.evaluation.onnx_detector import OnnxDetector
    from sidnet.quant.manifest import check_artifact

    if args.data is None:
        raise FileNotFoundError("--onnx needs --data conf/data/<x>.yaml (an ONNX file carries no data config)")
    if not args.onnx.exists():
        raise FileNotFoundError(f"ONNX file not found: {args.onnx}; pass a model.onnx written by python -m export")
    if not args.data.exists():
        raise FileNotFoundError(f"data config not found: {args.data}; pass a YAML from conf/data/")
    check_artifact(args.onnx)
    detector = OnnxDetector(args.onnx)
    records = load_records(load_data_yaml(args.data, project_root=PROJECT_ROOT), args.split, project_root=PROJECT_ROOT)
    extra = {"onnx": str(args.onnx), "model": detector.metadata.get("model"), "onnx_precision": detector.precision,
             "input_size": detector.input_size, "split": args.split, **environment("cpu"),
             "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}}  # fmt: skip
    return _evaluate(detector, records, args, size=detector.input_size, device=torch.device("cpu"), source=args.onnx,
                     extra=extra)  # fmt: skip


def _evaluate(model, records, args, *, size: int, device, source: Path, extra: dict, task=None,
              masks: bool = False) -> dict:  # fmt: skip
    from sidnet.data import DetectionDataset
    from sidnet.evaluation import evaluate_detections, write_report
    from sidnet.evaluation.predict import predict_dataset

    tag = args.split.replace(":", "_").replace("/", "of")  # val:1/2 -> val_1of2
    out = check_output_file(args.out or source.with_name(f"{source.stem}_{tag}_report.json"))  # before the long part
    dataset = DetectionDataset(records, size=size)
    preds, pred_masks = predict_dataset(model, dataset, task=task, device=device, batch_size=args.batch_size)
    report = evaluate_detections(records, preds, operating_conf=args.conf, masks=pred_masks if masks else None)
    extra = {k: v for k, v in extra.items() if k not in report}
    write_report(report, out, extra=extra)
    print(json.dumps({k: report.get(k) for k in KEYS}, indent=None))
    print(f"report: {out}")
    return report


if __name__ == "__main__":
    main()
