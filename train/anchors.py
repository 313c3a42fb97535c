"""Tune person anchors for a dataset: ``python -m train.anchors --data conf/data/coco128.yaml --out FILE``.

Reads the data YAML, loads the *train* split's person boxes, letterboxes their sizes to ``--size``, clusters them
with IoU k-means (+ optional evolution), prints avg IoU / BPR for the tuned and the current anchors, and writes the
anchors YAML atomically. Run from the repository root: relative paths resolve against the working directory; relative
roots inside a data YAML resolve as everywhere (:mod:`sidnet.data.sources`).
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sidnet.anchors import YOLOV2_VOC_ANCHORS, anchor_metrics, kmeans_anchors, letterboxed_wh
from sidnet.cli import OneLineParser, run_guarded
from sidnet.io import atomic_write_text
from sidnet.safety import load_yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# YOLOv5 autoanchor leaves boxes under 2 px out of the fit: they are label noise at this scale and drag a cluster.
MIN_FIT_SIZE = 2.0
DEFAULT_MODEL = "sidnet_mobilenetv2"  # conf/train.yaml's default model
# BPR levels shown in the table; the first one is the one written to the YAML (see sidnet.anchors for why 0.5).
BPR_THRESHOLDS = (0.5, 0.25)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m train.anchors", description=__doc__.splitlines()[0],
                           epilog="Example: python -m train.anchors --data conf/data/coco128.yaml --size 416 -k 3 "
                           "--out runs/anchors/coco128_person.yaml, then python -m train "
                           "model.anchors=runs/anchors/coco128_person.yaml").add_verbose()  # fmt: skip
    parser.add_argument("--data", required=True, help="data YAML (conf/data/*.yaml or your own)")
    parser.add_argument("--size", type=int, default=416, help="square network input size in pixels")
    parser.add_argument("-k", type=int, default=3, help="number of anchors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evolve", type=int, default=1000, help="generations of evolutionary refinement (0 = off)")
    parser.add_argument("--restarts", type=int, default=10, help="k-means restarts; the best mean IoU wins")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"compare against the anchors conf/model/<MODEL>.yaml trains with (default "
                        f"{DEFAULT_MODEL}, the training default)")  # fmt: skip
    parser.add_argument("--current", help="anchors YAML to compare against instead (yolov2-voc: YOLOv2's VOC anchors)")
    parser.add_argument("--out", help="where to write the tuned anchors YAML, e.g. runs/anchors/mydata.yaml (omit to "
                        "only print); train with it: python -m train model.anchors=FILE")  # fmt: skip
    return parser.parse_args(argv)


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.exists():
        raise SystemExit(f"error: {what} {path} not found")
    try:
        data = load_yaml(path, what=what, fix="pass a YAML like those in conf/")
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    if not isinstance(data, dict):
        raise SystemExit(f"error: {what} {path} must be a mapping at the top level")
    return data


def load_train_person_boxes(data_yaml: Path) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Load the train split of ``data_yaml`` (every source of it) and return its person boxes.

    Returns:
        ``(wh, image_sizes, num_images, num_negative_images)`` with ``wh`` the ``(K, 2)`` box sizes in original
        pixels and ``image_sizes`` the ``(K, 2)`` ``(w, h)`` of each box's image.
    """
    from sidnet.data.config import load_data_yaml
    from sidnet.data.loading import load_records

    try:  # relative roots: the project root for conf/data/*.yaml, else the YAML's own folder
        cfg = load_data_yaml(data_yaml, project_root=PROJECT_ROOT)
        records = load_records(cfg, "train", project_root=PROJECT_ROOT)
    except (ValueError, OSError) as exc:  # the data layer's DataError is a ValueError with a one-line message
        raise SystemExit(f"error: {data_yaml}: {exc}") from exc
    if "person" not in cfg.class_names:
        raise SystemExit(f"error: {data_yaml} class_names {cfg.class_names} has no 'person'")
    person = cfg.class_names.index("person")
    wh, sizes, negatives = [], [], 0
    for record in records:
        boxes = np.asarray(record.boxes, dtype=np.float64).reshape(-1, 4)[np.asarray(record.labels) == person]
        negatives += len(boxes) == 0
        wh.append(boxes[:, 2:] - boxes[:, :2])
        sizes.append(np.tile([record.width, record.height], (len(boxes), 1)))
    if not records:
        raise SystemExit(f"error: the train split of {data_yaml} has no images")
    return np.concatenate(wh), np.concatenate(sizes).astype(np.float64), len(records), negatives


def model_anchors_file(model: str) -> str:
    """The anchors file ``conf/model/<model>.yaml`` trains with (``model.anchors``), relative to the repository."""
    conf = Path(__file__).resolve().parents[1] / "conf" / "model" / f"{model}.yaml"
    if not conf.is_file():
        names = ", ".join(sorted(p.stem for p in conf.parent.glob("*.yaml")))
        raise SystemExit(f"error: --model {model}: no {conf}; use one of {names}")
    anchors = _read_yaml(conf, "model config").get("anchors")
    if not isinstance(anchors, str):
        raise SystemExit(f"error: --model {model} has no anchors file (model.anchors: {anchors!r}); pass --current")
    return anchors


def read_current_anchors(path: str | None, *, size: int) -> tuple[np.ndarray, str]:
    """Anchors to compare against, in pixels at ``size``, and a label for the table.

    A YAML written for another input size is rescaled (anchors scale with the letterbox). ``yolov2-voc`` gives the
    YOLOv2 VOC anchors; they are defined in stride-32 grid units, so ``x32`` is pixels at any input size.
    """
    if path == "yolov2-voc":
        return YOLOV2_VOC_ANCHORS.copy(), "yolov2-voc"
    if path is None or not Path(path).is_file():
        raise SystemExit(f"error: anchors file {path} not found; pass --current FILE or --current yolov2-voc")
    cfg = _read_yaml(Path(path), "anchors file")
    anchors = np.asarray(cfg.get("anchors", []), dtype=np.float64)
    if anchors.ndim != 2 or anchors.shape[1] != 2 or len(anchors) == 0 or (anchors <= 0).any():
        raise SystemExit(f"error: {path} must hold 'anchors: [[w, h], ...]' with positive sizes")
    written_size = int(cfg.get("size", size))
    label = f"current ({path})"
    if written_size != size:
        anchors = anchors * (size / written_size)
        label += f" rescaled {written_size}->{size}"
    return anchors, label


def metrics_row(wh: np.ndarray, anchors: np.ndarray) -> dict[str, float]:
    """avg IoU and BPR at every level of :data:`BPR_THRESHOLDS`."""
    row = {"avg_iou": anchor_metrics(wh, anchors)["avg_iou"]}
    for t in BPR_THRESHOLDS:
        row[f"bpr@{t}"] = anchor_metrics(wh, anchors, iou_threshold=t)["bpr"]
    return row


def format_table(rows: Sequence[tuple[str, np.ndarray, dict[str, float]]]) -> str:
    """Plain-text table: name, k, avg IoU, BPR columns, then the anchors themselves."""
    width = max(len("anchors"), *(len(name) for name, _, _ in rows))
    bpr_cols = [f"BPR@{t}" for t in BPR_THRESHOLDS]
    lines = [f"{'anchors':<{width}}  {'k':>2}  {'avg IoU':>7}  " + "  ".join(f"{c:>8}" for c in bpr_cols)]
    for name, anchors, m in rows:
        bprs = "  ".join(f"{m[f'bpr@{t}']:>8.3f}" for t in BPR_THRESHOLDS)
        lines.append(f"{name:<{width}}  {len(anchors):>2}  {m['avg_iou']:>7.3f}  {bprs}")
    for name, anchors, _ in rows:
        lines.append(f"{name}: {_anchor_list(anchors)}")
    return "\n".join(lines)


def _anchor_list(anchors: np.ndarray) -> str:
    return "[" + ", ".join(f"[{w:.1f}, {h:.1f}]" for w, h in anchors) + "]"


def write_anchors_yaml(path: Path, anchors: np.ndarray, meta: dict[str, Any]) -> None:
    """Write the anchors file atomically (temporary file + ``os.replace``) after checking it parses back."""
    date = datetime.date.today().isoformat()
    lines = [
        f"# Written by `python -m train.anchors` on {date}; do not edit by hand (re-run the script).",
        f"anchors: {_anchor_list(anchors)}   # pixels at the network input size, sorted by area, rounded to 0.1",
    ]
    # json.dumps gives valid YAML scalars (quoted strings, plain numbers) without yaml.dump's flow-style guesses.
    lines += [f"{key}: {json.dumps(value)}" for key, value in meta.items()]
    text = "\n".join(lines) + "\n"
    parsed = yaml.safe_load(text)
    if not np.allclose(np.asarray(parsed["anchors"]), anchors, atol=0.051):
        raise RuntimeError(f"anchors YAML for {path} does not round-trip; refusing to write it")
    atomic_write_text(path, text)


def tune(
    wh: np.ndarray,
    *,
    k: int,
    seed: int,
    evolve: int,
    restarts: int = 10,
    current: tuple[np.ndarray, str] | None = None,
) -> tuple[np.ndarray, str, dict[str, float]]:
    """Fit anchors to letterboxed sizes ``wh``, print the comparison table, and return (anchors, table, metrics).

    Boxes under :data:`MIN_FIT_SIZE` pixels are left out of the fit but counted in every metric. The returned
    anchors are rounded to 0.1 px (what gets written), and the metrics are those of the rounded anchors.
    """
    fit = wh[(wh >= MIN_FIT_SIZE).all(axis=1)]
    if len(fit) < len(wh):
        print(f"k-means ignores {len(wh) - len(fit)} boxes under {MIN_FIT_SIZE:g} px (still counted in the metrics)")
    anchors = kmeans_anchors(fit, k=k, seed=seed, restarts=restarts, evolve_generations=evolve).round(1)
    metrics = metrics_row(wh, anchors)
    rows = [(f"tuned (k-means{' + evolve' if evolve else ''})", anchors, metrics)]
    if current is not None:
        rows.append((current[1], current[0], metrics_row(wh, current[0])))
    table = format_table(rows)
    print(table)
    return anchors, table, metrics


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stopped = "anchor tuning interrupted: no anchors file was written (it is written whole at the end)"
    return run_guarded(lambda: _run(args), verbose=args.verbose, interrupted=stopped)


def _run(args: argparse.Namespace) -> int:
    # Read the comparison anchors before anything is written: --current and --out are usually the same file.
    current = read_current_anchors(args.current or model_anchors_file(args.model), size=args.size)
    wh_orig, image_sizes, num_images, negatives = load_train_person_boxes(Path(args.data))
    if len(wh_orig) == 0:
        raise SystemExit(f"error: no person boxes in the train split of {args.data}; check class_map and labels")
    try:
        wh = letterboxed_wh(wh_orig, image_sizes, size=args.size)
        print(f"data: {num_images} images ({negatives} without persons), {len(wh)} person boxes at {args.size} px")
        anchors, _, metrics = tune(
            wh, k=args.k, seed=args.seed, evolve=args.evolve, restarts=args.restarts, current=current
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    if args.out:
        meta = {
            "size": args.size,
            "k": args.k,
            "seed": args.seed,
            "evolve": args.evolve,
            "data": args.data,
            "num_boxes": len(wh),
            "avg_iou": round(metrics["avg_iou"], 4),
            "bpr": round(metrics[f"bpr@{BPR_THRESHOLDS[0]}"], 4),
            "bpr_iou_threshold": BPR_THRESHOLDS[0],
        }
        write_anchors_yaml(Path(args.out), anchors, meta)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
