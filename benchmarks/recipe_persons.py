"""Helpers of ``benchmarks/recipe_persons.sh`` (the persons recipe): pack the data for the GPU machine, score the
reference detector with the project's evaluator, and print the one results table.

    python benchmarks/recipe_persons.py pack --data conf/data/persons.yaml --out DIR [--quality 50] [--splits val]
    python benchmarks/recipe_persons.py reference --data conf/data/persons.yaml --out ref.json   # needs OpenCV < 5
    python benchmarks/recipe_persons.py table --reports DIR [--out table.md]
    python benchmarks/recipe_persons.py slim runs/x/last.pt OUT/x.pt   # OUT/x.pt.0, .1 (float16, <= 15 MiB each)
    python benchmarks/recipe_persons.py join OUT/x.pt x.pt             # back to one float32 checkpoint

``pack`` re-encodes every image of every source of both splits as JPEG (native size unless ``--max-side``) into a
YOLO-layout folder with its own ``persons.yaml`` (relative roots: ``python -m train data=<folder>/persons.yaml``), so
the three sets fit the GPU machine's 64 MiB per call. ``reference`` runs ``../shared/data/reference``'s Darknet model
through ``cv2.dnn`` on the same records the project evaluates (same letterbox-free 416 resize Darknet uses) and writes
the report with :func:`sidnet.evaluation.evaluate_by_source`, the evaluator every other row uses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)) if str(ROOT) not in sys.path else None  # run as a script from anywhere
REFERENCE = Path(os.environ.get("SIDNET_REFERENCE", ROOT / "../shared/data/reference/yolo-fastest-1.1_body"))
ROWS = ("checkpoint", "onnx_fp32", "onnx_int8", "reference", "ablation")
METRICS = ("AP50", "AP", "AP_small", "recall", "recall_small")


def _data(path: str):
    from sidnet.data.config import load_data_yaml

    return load_data_yaml(path, project_root=ROOT)


def _repeats(items: list[str]) -> dict[str, int]:
    """``["coco128=4"]`` -> ``{"coco128": 4}``: train sources shown that many times per epoch in the packed YAML."""
    out = {}
    for item in items:
        name, _, n = item.partition("=")
        if not n.isdigit() or int(n) < 1:
            raise SystemExit(f"error: --repeat {item}: use SOURCE=N with a whole N >= 1, e.g. coco128=4")
        out[name] = int(n)
    return out


def pack(args: argparse.Namespace) -> None:
    import cv2
    import yaml

    from sidnet.data import load_rgb
    from sidnet.data.loading import load_records

    data, out = _data(args.data), Path(args.out)
    repeat = _repeats(args.repeat)
    splits: dict[str, list] = {}
    for split in args.splits.split(","):
        records = load_records(data, split, project_root=ROOT)
        for source in dict.fromkeys(r.source or split for r in records):
            limit = args.val_limit if split == "val" and args.val_limit else args.limit
            mine = [r for r in records if (r.source or split) == source][: limit or None]
            for r in mine:
                image = cv2.cvtColor(load_rgb(r), cv2.COLOR_RGB2BGR)
                h, w = image.shape[:2]
                side = args.max_side if split == "train" else args.val_max_side
                k = min(1.0, side / max(h, w)) if side else 1.0
                if k < 1.0:
                    image = cv2.resize(image, (round(w * k), round(h * k)), interpolation=cv2.INTER_AREA)
                name = Path(r.path).stem
                img_path = out / source / "images" / split / f"{name}.jpg"
                img_path.parent.mkdir(parents=True, exist_ok=True)
                quality = args.val_quality if split == "val" and args.val_quality else args.quality
                cv2.imwrite(str(img_path), image, [cv2.IMWRITE_JPEG_QUALITY, quality])
                lbl = out / source / "labels" / split / f"{name}.txt"
                lbl.parent.mkdir(parents=True, exist_ok=True)
                b = np.asarray(r.boxes, dtype=np.float64).reshape(-1, 4) / [w, h, w, h]
                lines = [f"{int(c)} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}"
                         for (x1, y1, x2, y2), c in zip(b, r.labels, strict=True)]  # fmt: skip
                lbl.write_text("".join(line + "\n" for line in lines))
            splits.setdefault(split, []).append({"name": source, "root": source, "format": "yolo",
                                                 "images": f"images/{split}", "labels": f"labels/{split}"})  # fmt: skip
            print(f"packed {split}/{source}: {len(mine)} images")
    cfg = {"root": ".", **splits, "class_names": list(data.class_names), "class_map": {0: 0}, "num_label_classes": 1,
           "negative_ratio": data.negative_ratio, "lenient": False}  # fmt: skip
    (out / "persons.yaml").write_text("# Written by benchmarks/recipe_persons.py pack (JPEG re-encoded copies; roots "
                                      "relative to this file)\n" + yaml.safe_dump(cfg, sort_keys=False))  # fmt: skip
    if repeat:  # the same images, some train sources shown several times per epoch
        unknown = set(repeat) - {s["name"] for s in splits.get("train", [])}
        if unknown:
            raise SystemExit(f"error: --repeat {sorted(unknown)}: no such train source in {args.data}")
        cfg["train"] = [{**s, "repeat": repeat[s["name"]]} if s["name"] in repeat else s for s in cfg["train"]]
        (out / "persons_repeat.yaml").write_text(f"# persons.yaml with --repeat {' '.join(args.repeat)}\n"
                                                 + yaml.safe_dump(cfg, sort_keys=False))  # fmt: skip
    if args.weights:  # the MobileNetV2 trunk's ImageNet weights, features only, float16: half the bytes to carry
        import torch

        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()
                    if not k.startswith("classifier")}, out / "mobilenetv2_features_fp16.pt")  # fmt: skip
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out}/persons.yaml; {size / 2**20:.1f} MiB in {out}")


def _reference_predictions(records, *, size: int, folder: Path = REFERENCE) -> tuple[dict[int, np.ndarray], float]:
    """yolo-fastest-1.1 body through cv2.dnn: plain resize to size x size (as Darknet runs it), RGB, [0, 1]; rows
    ``[x1, y1, x2, y2, score, 0]`` in original pixels after OpenCV's NMS at IoU 0.45, scores down to 0.001."""
    import cv2

    if int(cv2.__version__.split(".")[0]) >= 5:
        raise SystemExit(f"error: OpenCV {cv2.__version__} has no readNetFromDarknet; run this with opencv<5 "
                         "(e.g. a venv: pip install 'opencv-python-headless<5')")  # fmt: skip
    cfg = folder / "yolo-fastest-1.1_body.cfg"
    if not cfg.is_file():
        raise SystemExit(f"error: reference detector not found: {cfg}; pass --reference FOLDER")
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(folder / "yolo-fastest-1.1_body.weights"))
    names = net.getUnconnectedOutLayersNames()
    preds, t0 = {}, time.perf_counter()
    for r in records:
        image = cv2.imread(str(r.path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        h, w = image.shape[:2]
        net.setInput(cv2.dnn.blobFromImage(image, 1 / 255.0, (size, size), swapRB=True, crop=False))
        rows = np.concatenate([o.reshape(-1, o.shape[-1]) for o in net.forward(names)])
        scores = rows[:, 5:].max(axis=1)  # OpenCV's region layer already multiplies class by objectness
        keep = scores >= 0.001
        rows, scores = rows[keep], scores[keep]
        boxes = np.stack([(rows[:, 0] - rows[:, 2] / 2) * w, (rows[:, 1] - rows[:, 3] / 2) * h,
                          rows[:, 2] * w, rows[:, 3] * h], axis=1)  # fmt: skip
        idx = np.asarray(cv2.dnn.NMSBoxes(boxes.tolist(), scores.tolist(), 0.001, 0.45), dtype=int).reshape(-1)[:100]
        b = boxes[idx]
        preds[int(r.image_id)] = np.column_stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3],
                                                  scores[idx], np.zeros(len(idx))])  # fmt: skip
    return preds, (time.perf_counter() - t0) / max(1, len(records))


def reference(args: argparse.Namespace) -> None:
    import cv2

    from sidnet.data.loading import load_records
    from sidnet.environment import environment
    from sidnet.evaluation import evaluate_by_source, write_report

    records = load_records(_data(args.data), args.split, project_root=ROOT)
    preds, sec = _reference_predictions(records, size=args.size, folder=Path(args.reference))
    report = evaluate_by_source(records, preds, operating_conf=args.conf)
    write_report(report, args.out, extra={"model": "yolo-fastest-1.1_body (reference)", "input_size": args.size,
                                          "data": args.data, "split": args.split, "opencv": cv2.__version__,
                                          "ms_per_image_cpu": round(sec * 1000, 2), **environment("cpu")})  # fmt: skip
    print(json.dumps({k: report.get(k) for k in METRICS}))
    print(f"report: {args.out}")


PART_BYTES = 15 * 2**20  # the GPU machine returns files of at most 16 MiB


def slim(args: argparse.Namespace) -> None:
    """A training checkpoint → its EMA weights, conv/linear weights in float16 (BatchNorm statistics and biases stay
    float32), no optimizer state, cut into ``<out>.0``, ``<out>.1``, ... of at most 15 MiB (what the GPU machine
    returns). ``join`` restores a float32 checkpoint that evaluates and exports like any other."""
    from sidnet.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(args.checkpoint)
    weights = state["ema"] if state.get("ema") is not None else state["model_state"]
    keep = {k: state[k] for k in ("model", "epoch", "step", "best_ap50", "history", "config", "metrics") if k in state}
    half = {k: v.half() if v.is_floating_point() and v.ndim > 1 else v.clone() for k, v in weights.items()}
    tmp = Path(f"{args.out}.tmp")
    save_checkpoint({**keep, "model_state": half, "ema": None, "slim_of": str(args.checkpoint)}, tmp,
                    keep_previous=False)  # fmt: skip
    data = tmp.read_bytes()
    tmp.unlink()
    for i in range(0, len(data), PART_BYTES):
        Path(f"{args.out}.{i // PART_BYTES}").write_bytes(data[i : i + PART_BYTES])
    print(f"{args.checkpoint} -> {args.out}.0..{(len(data) - 1) // PART_BYTES} ({len(data) / 2**20:.1f} MiB)")


def join(args: argparse.Namespace) -> None:
    """``<parts>.0``, ``<parts>.1``, ... from ``slim`` → a float32 checkpoint at ``out``."""
    from sidnet.checkpoint import load_checkpoint, save_checkpoint

    parts = sorted(Path(args.parts).parent.glob(Path(args.parts).name + ".*"), key=lambda p: int(p.suffix[1:]))
    if not parts:
        raise SystemExit(f"error: no {args.parts}.0, .1, ... to join")
    tmp = Path(f"{args.out}.tmp")
    tmp.write_bytes(b"".join(p.read_bytes() for p in parts))
    state = load_checkpoint(tmp)
    tmp.unlink()
    state["model_state"] = {k: v.float() if v.is_floating_point() else v for k, v in state["model_state"].items()}
    save_checkpoint(state, args.out, keep_previous=False)
    print(f"{len(parts)} parts -> {args.out}")


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def table(args: argparse.Namespace) -> str:
    """reports DIR/<row>.json → one markdown table, per source: :data:`ROWS` first (any missing skipped), then the
    other reports (the recipe's --variant runs) by name."""
    folder = Path(args.reports)
    extra = sorted(p.stem for p in folder.glob("*.json") if p.stem not in ROWS)
    reports = {row: json.loads((folder / f"{row}.json").read_text()) for row in [*ROWS, *extra]
               if (folder / f"{row}.json").is_file()}  # fmt: skip
    if not reports:
        raise SystemExit(f"error: no reports ({', '.join(ROWS)}).json in {args.reports}")
    sources = list(next(iter(reports.values())).get("per_source", {})) or ["all"]
    head = "| model | " + " | ".join(f"{s} {m}" for s in [*sources, "all"] for m in ("AP50", "AP", "AP_small",
                                                                                       "rec@0.3"))  # fmt: skip
    lines = [head, "|---" * (1 + 4 * (len(sources) + 1)) + "|"]
    for row, rep in reports.items():
        cells = []
        for s in [*sources, "all"]:
            r = rep if s == "all" else rep.get("per_source", {}).get(s, {})
            cells += [_fmt(r.get(k)) for k in ("AP50", "AP", "AP_small", "recall")]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    small = ["", "| model | " + " | ".join(f"{s} AP_small / recall_small (n)" for s in [*sources, "all"]) + " |",
             "|---" * (len(sources) + 2) + "|"]  # fmt: skip
    for row, rep in reports.items():
        cells = []
        for s in [*sources, "all"]:
            r = rep if s == "all" else rep.get("per_source", {}).get(s, {})
            cells.append(f"{_fmt(r.get('AP_small'))} / {_fmt(r.get('recall_small'))} ({r.get('num_small_gt_boxes')})")
        small.append(f"| {row} | " + " | ".join(cells) + " |")
    text = "\n".join(lines + small) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--data", default="conf/data/persons.yaml")
    a.add_argument("--out", required=True)
    a.add_argument("--quality", type=int, default=80)
    a.add_argument("--max-side", type=int, default=0, help="train images: shrink to this long side (0: native)")
    a.add_argument("--limit", type=int, default=0, help="at most this many images per source and split (smoke)")
    a.add_argument("--val-limit", type=int, default=0, help="val: at most this many per source (a sanity check only)")
    a.add_argument("--val-quality", type=int, default=0, help="val images' JPEG quality (0: --quality)")
    a.add_argument("--val-max-side", type=int, default=0,
                   help="val images: shrink to this long side (0: native; the network's input size keeps the "
                        "evaluation close to the originals')")
    a.add_argument("--repeat", action="append", default=[], metavar="SOURCE=N",
                   help="also write persons_repeat.yaml: the same copy with this train source shown N times per epoch")
    a.add_argument("--splits", default="train,val", help="which splits to pack, e.g. val (an evaluation copy)")
    a.add_argument("--weights", help="also write this MobileNetV2 .pt as float16 features")
    a = sub.add_parser("reference")
    a.add_argument("--data", default="conf/data/persons.yaml")
    a.add_argument("--split", default="val")
    a.add_argument("--size", type=int, default=416)
    a.add_argument("--reference", default=str(REFERENCE), help="folder of yolo-fastest-1.1_body.{cfg,weights}")
    a.add_argument("--conf", type=float, default=0.3)
    a.add_argument("--out", required=True)
    a = sub.add_parser("slim")
    a.add_argument("checkpoint")
    a.add_argument("out")
    a = sub.add_parser("join")
    a.add_argument("parts")
    a.add_argument("out")
    a = sub.add_parser("table")
    a.add_argument("--reports", required=True)
    a.add_argument("--out")
    args = p.parse_args(argv)
    {"pack": pack, "reference": reference, "table": table, "slim": slim, "join": join}[args.cmd](args)


if __name__ == "__main__":
    main()
