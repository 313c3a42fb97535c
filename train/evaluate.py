"""``python -m train.evaluate --checkpoint runs/<name>/best.pt``: COCO AP/AP50/AP75/AP_small for persons, recall and
precision at confidence 0.3, false positives per person-free image (and COCO segm AP for Mask R-CNN when the data
has masks); writes a JSON report.

The data defaults to the checkpoint's own validation split; ``--data conf/data/<x>.yaml`` evaluates elsewhere.
``--onnx model.onnx --data conf/data/<x>.yaml`` evaluates an exported ONNX (FP32, FP16 or INT8 Q/DQ, native target;
a Mask R-CNN export: box and segm AP) in onnxruntime through the same evaluator and report; an INT8 model is checked
against its provenance manifest first.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from sidnet.cli import OneLineParser, positive_int, run_guarded, unit_interval
from sidnet.safety import check_output_file

# The library (torch, albumentations, pycocotools: ~5 s of imports on a 2-core CPU) is imported after the arguments
# are parsed, so a mistyped flag is refused at once.

PROJECT_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = """Examples:
  python -m train.evaluate --checkpoint runs/sidnet_mobilenetv2/best.pt            # the run's own val split
  python -m train.evaluate --checkpoint runs/sidnet_mobilenetv2/best.pt --data conf/data/coco128.yaml --split val:1/2
  python -m train.evaluate --onnx runs/sidnet_mobilenetv2/export/int8/model.onnx --data conf/data/coco128.yaml \\
      --split val:1/2                                                              # an export, in onnxruntime
Writes <report>.json, <report>_pr.png (precision-recall at IoU 0.5) and <report>_images/ (annotated)."""
KEYS = ("AP", "AP50", "AP75", "AP_small", "recall", "recall_small", "precision", "fp_per_negative_image", "segm_AP",
        "segm_AP50")


def main(argv: list[str] | None = None) -> dict:
    p = OneLineParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                      formatter_class=argparse.RawDescriptionHelpFormatter).add_verbose()  # fmt: skip
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
    p.add_argument("--size", type=positive_int, help="--checkpoint: evaluate at this input side instead of the "
                   "trained one (a multiple of 32, e.g. 512: more pixels per person, slower)")  # fmt: skip
    p.add_argument("--boxes-only", action="store_true", help="Mask R-CNN: box metrics only (data without masks)")
    p.add_argument("--out", type=Path, help="JSON report (default: next to the checkpoint); the PR curve PNG and "
                   "annotated images go beside it")  # fmt: skip
    p.add_argument("--images", type=int, default=4, help="annotated validation images written beside the report "
                   "(default 4; 0: none)")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar (off anyway when stderr is no terminal)")
    p.add_argument("--json", action="store_true", help="print the report's metrics as JSON on stdout (no table)")
    args = p.parse_args(argv)
    if args.onnx is not None and args.data is None:  # before any work, not after loading the model
        p.error("--onnx needs --data conf/data/<x>.yaml (an ONNX file carries no data config)")
    if args.onnx is not None and args.size is not None:
        p.error("--size applies to --checkpoint: an ONNX file has the input size it was exported at (export another "
                "with python -m export --checkpoint ... input_size=N)")  # fmt: skip
    if args.size is not None:
        from sidnet.safety import UnsafeInputError, check_input_size

        try:
            check_input_size(args.size, where="--size", fix="use e.g. --size 512")
        except UnsafeInputError as e:
            p.error(str(e))
    from sidnet.progress import set_quiet

    set_quiet(args.quiet)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip
    stopped = "evaluation interrupted: no report was written (it is written whole at the end); run it again"
    return run_guarded(lambda: evaluate_onnx(args) if args.onnx is not None else evaluate(args), verbose=args.verbose,
                       interrupted=stopped)  # fmt: skip


def evaluate(args: argparse.Namespace) -> dict:
    import torch

    from sidnet.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
    from sidnet.data.config import data_config, load_data_yaml
    from sidnet.data.loading import load_records
    from sidnet.engine.tasks import build_task
    from sidnet.engine.trainer import resolve_device
    from sidnet.environment import environment

    state = load_checkpoint(args.checkpoint)
    if state.get("quant"):  # QAT: the fake-quantized model, as trained
        from sidnet.quant.qat import fake_quant_model

        model = fake_quant_model(state, ema=not args.no_ema, input_size=args.size)
    else:
        model = model_from_checkpoint(state, ema=not args.no_ema, input_size=args.size)
    size = model.input_size
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
             "input_size": size, "trained_input_size": state["model"]["input_size"], "split": args.split,
             "fake_quant": bool(state.get("quant")),
             **environment(device),
             "versions": {"torch": torch.__version__}}  # fmt: skip
    return _evaluate(model, records, args, size=size, device=device, source=args.checkpoint,
                     extra=extra, task=task, masks=masks)  # fmt: skip


def evaluate_onnx(args: argparse.Namespace) -> dict:
    """The ``--onnx`` path: same records, same predict/evaluate, onnxruntime instead of PyTorch."""
    import onnxruntime
    import torch

    from sidnet.data.config import load_data_yaml
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
    masks = "segm" in detector.iou_types and not args.boxes_only
    records = load_records(
        load_data_yaml(args.data, project_root=PROJECT_ROOT), args.split, project_root=PROJECT_ROOT, masks=masks
    )
    extra = {"onnx": str(args.onnx), "model": detector.metadata.get("model"), "onnx_precision": detector.precision,
             "input_size": detector.input_size, "split": args.split, **environment("cpu"),
             "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}}  # fmt: skip
    return _evaluate(detector, records, args, size=detector.input_size, device=torch.device("cpu"), source=args.onnx,
                     extra=extra, masks=masks)  # fmt: skip


def _evaluate(model, records, args, *, size: int, device, source: Path, extra: dict, task=None,
              masks: bool = False) -> dict:  # fmt: skip
    from sidnet.data import DetectionDataset
    from sidnet.evaluation import evaluate_by_source, write_report
    from sidnet.evaluation.predict import predict_dataset

    tag = args.split.replace(":", "_").replace("/", "of")  # val:1/2 -> val_1of2
    out = check_output_file(args.out or source.with_name(f"{source.stem}_{tag}_report.json"))  # before the long part
    dataset = DetectionDataset(records, size=size)
    preds, pred_masks = predict_dataset(model, dataset, task=task, device=device, batch_size=args.batch_size,
                                        desc=f"evaluate {args.split}")  # fmt: skip
    report = evaluate_by_source(records, preds, operating_conf=args.conf, masks=pred_masks if masks else None)
    extra = {k: v for k, v in extra.items() if k not in report}
    write_report(report, out, extra=extra)
    from sidnet.plots import annotated_images, pr_curve_png

    stem = out.with_suffix("")
    pictures = [pr_curve_png(report, stem.with_name(stem.name + "_pr.png"))]
    if args.images > 0:
        pictures += annotated_images(records, preds, stem.with_name(stem.name + "_images"), conf=args.conf,
                                     count=args.images)  # fmt: skip
    per_source = report.get("per_source", {})
    if args.json:
        print(json.dumps({k: report.get(k) for k in KEYS}, indent=None))
        for name, r in per_source.items():
            print(f"{name}: " + json.dumps({k: r.get(k) for k in KEYS if k in r}, indent=None))
        return report
    from sidnet.progress import print_table

    rows = [(k, report[k]) for k in KEYS if report.get(k) is not None]
    rows += [("images / person boxes", f"{report['num_images']} / {report['num_gt_boxes']}"),
             (f"TP / FP / FN @{args.conf:g}", f"{report['tp']} / {report['fp']} / {report['fn']}")]  # fmt: skip
    print_table(f"evaluation of {source} on {args.split}", ["metric", "value"], rows)
    if per_source:
        cols = [k for k in ("AP50", "AP", "AP_small", "recall", "recall_small") if report.get(k) is not None]
        print_table("per source", ["source", *cols],
                    [(name, *(r.get(k) for k in cols)) for name, r in per_source.items()])  # fmt: skip
    print(f"report: {out}\nplots: {pictures[0]}" + (f", {pictures[1].parent}/ ({len(pictures) - 1} images)"
                                                     if len(pictures) > 1 else ""))  # fmt: skip
    return report


if __name__ == "__main__":
    main()
