"""Pictures beside an evaluation report, drawn with PIL (no matplotlib): the precision-recall curve and a few
validation images with truth (green) and predictions at the operating confidence (red, with scores)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

W, H, MARGIN = 640, 480, 60


def pr_curve_png(report: Mapping, path: Path) -> Path:
    """``report["pr_curve"]`` (from :func:`sidnet.evaluation.evaluate_detections`) as a PNG at ``path``, with AP50
    in the title and the operating point (recall, precision at ``operating_conf``) marked."""
    curve = report["pr_curve"]
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = MARGIN, 30, W - 20, H - MARGIN  # plot area: recall right, precision up

    def xy(r: float, p: float) -> tuple[float, float]:
        return x0 + r * (x1 - x0), y1 - p * (y1 - y0)

    for t in np.linspace(0, 1, 6):
        d.line([xy(t, 0), xy(t, 1)], fill=(225, 225, 225))
        d.line([xy(0, t), xy(1, t)], fill=(225, 225, 225))
        d.text((xy(t, 0)[0] - 8, y1 + 6), f"{t:.1f}", fill="black")
        d.text((x0 - 30, xy(0, t)[1] - 6), f"{t:.1f}", fill="black")
    d.rectangle([x0, y0, x1, y1], outline="black")
    points = [xy(r, p) for r, p in zip(curve["recall"], curve["precision"], strict=True) if p is not None]
    if len(points) > 1:
        d.line(points, fill=(31, 119, 180), width=3)
    elif points:
        d.ellipse([points[0][0] - 3, points[0][1] - 3, points[0][0] + 3, points[0][1] + 3], fill=(31, 119, 180))
    r, p = report.get("recall"), report.get("precision")
    if r is not None and p is not None:
        cx, cy = xy(r, p)
        d.ellipse([cx - 6, cy - 6, cx + 6, cy + 6], outline=(214, 39, 40), width=3)
        label = f"conf {report.get('operating_conf', 0.3):g}: R {r:.2f} P {p:.2f}"
        d.text((cx + 9, cy - 16), label, fill=(214, 39, 40))
    ap50 = report.get("AP50")
    title = f"precision-recall, IoU {curve['iou']}, person: AP50 {ap50:.3f}" if ap50 is not None else "precision-recall"
    d.text((x0, 10), title, fill="black")
    d.text(((x0 + x1) // 2 - 20, H - 28), "recall", fill="black")
    d.text((6, (y0 + y1) // 2), "precision", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def annotated_images(records: Sequence, predictions: Mapping[int, np.ndarray], out_dir: Path, *, conf: float,
                     count: int = 4, person_label: int = 0) -> list[Path]:  # fmt: skip
    """The first ``count`` images with persons: truth boxes green, predictions with score >= ``conf`` red."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for rec in [r for r in records if len(r.boxes)][:count]:
        img = Image.open(rec.path).convert("RGB")
        d = ImageDraw.Draw(img)
        gt = np.asarray(rec.boxes, np.float32).reshape(-1, 4)[np.asarray(rec.labels) == person_label]
        for b in gt:
            d.rectangle(b.tolist(), outline=(0, 200, 0), width=2)
        pred = np.asarray(predictions.get(int(rec.image_id), np.zeros((0, 6))), np.float32).reshape(-1, 6)
        for row in pred[(pred[:, 4] >= conf) & (pred[:, 5] == person_label)]:
            d.rectangle(row[:4].tolist(), outline=(220, 30, 30), width=2)
            d.text((row[0] + 2, max(0.0, row[1] - 11)), f"{row[4]:.2f}", fill=(220, 30, 30))
        path = out_dir / f"{Path(rec.path).stem}.jpg"
        img.save(path, quality=90)
        written.append(path)
    return written
