"""Rebuild the bundled sample from ``../shared/data/coco128`` (developer tool; not imported by the library).

Usage, from the repository root::

    python -m sidnet.sample.build_sample [--shared ../shared/data]

Images are re-encoded as JPEG quality 85 with the long side <= 416; labels are YOLO ``0 cx cy w h`` (person only),
which normalisation makes independent of the re-encoding size. Writes images/, labels/ and ATTRIBUTION.md here, in
coco128's layout (``images/{train2017,val2017}``, ``labels/boxes/{train2017,val2017}``) so that a data config
written for coco128's YOLO labels (``conf/data/auto.yaml``) also reads the sample.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from sidnet.data import read_coco, read_yolo

HERE = Path(__file__).resolve().parent
LONG_SIDE = 416
# Train picks: Flickr licences that allow redistribution of modified copies (CC BY / BY-SA / no known copyright
# restrictions; no NC or ND), no iscrowd regions, 1-7 persons; negatives: one unlabeled image (a coco128 quirk)
# and one with other objects only. Val licences are not in the train JSON, so val picks could not be filtered.
TRAIN = [
    "000000000086",
    "000000000165",
    "000000000308",
    "000000000360",
    "000000000520",
    "000000000529",
    "000000000030",
    "000000000508",
]
VAL = ["000000000139", "000000001353", "000000002473", "000000000632"]


def _write(record, split: str) -> None:
    with Image.open(record.path) as im:
        im = im.convert("RGB")
        scale = min(1.0, LONG_SIDE / max(im.size))
        if scale < 1.0:
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
        (HERE / "images" / split).mkdir(parents=True, exist_ok=True)
        im.save(HERE / "images" / split / f"{record.path.stem}.jpg", quality=85)
    lines = []
    for x1, y1, x2, y2 in record.boxes.tolist():
        cx, cy = (x1 + x2) / 2 / record.width, (y1 + y2) / 2 / record.height
        w, h = (x2 - x1) / record.width, (y2 - y1) / record.height
        lines.append(f"0 {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
    (HERE / "labels" / "boxes" / split).mkdir(parents=True, exist_ok=True)
    (HERE / "labels" / "boxes" / split / f"{record.path.stem}.txt").write_text("".join(lines))


def _write_segments(root: Path, stem: str, split: str) -> None:
    """Person polygons (YOLO-seg, normalised, so the re-encoding size does not matter) from coco128's
    ``labels/segments`` (person = id 1 there), rewritten with class 0: Mask R-CNN runs on the sample too."""
    src = root / "labels" / "segments" / split / f"{stem}.txt"
    lines = [ln for ln in (src.read_text().splitlines() if src.is_file() else []) if ln.split()[:1] == ["1"]]
    out = HERE / "labels" / "segments" / split
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.txt").write_text("".join("0" + ln[1:] + "\n" for ln in lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    root = parser.parse_args().shared / "coco128"
    ann = root / "annotations" / "instances_train2017.json"
    train, _ = read_coco(annotations=ann, images=root / "images" / "train2017")
    val, _ = read_yolo(images=root / "images" / "val2017", labels=root / "labels" / "boxes" / "val2017")
    coco = json.loads(ann.read_text())
    licenses = {lic["id"]: lic for lic in coco["licenses"]}
    meta = {im["id"]: im for im in coco["images"]}

    rows = []
    for split, records, stems in (("train2017", train, TRAIN), ("val2017", val, VAL)):
        by_stem = {r.path.stem: r for r in records}
        for stem in stems:
            r = by_stem[stem]
            _write(r, split)
            _write_segments(root, stem, split)
            if split == "train2017":
                im = meta[r.image_id]
                lic = licenses[im["license"]]
                source = f"[{lic['name']}]({lic['url']}); Flickr: {im['flickr_url']}; COCO: {im['coco_url']}"
            else:
                source = "COCO 2017 val, Flickr, see cocodataset.org (licence id not in the bundled train JSON)"
            rows.append(f"| {split} | {r.path.name} | {r.image_id} | {len(r.boxes)} | {source} |")

    (HERE / "ATTRIBUTION.md").write_text(
        "# Bundled sample: attribution\n\n"
        "12 images from the COCO 2017 dataset (via the coco128 subset in `../shared/data`), re-encoded as JPEG "
        f"quality 85 with the long side <= {LONG_SIDE} px. Regenerate with `python -m sidnet.sample.build_sample`.\n\n"
        "**Images** remain under their Flickr owners' licences listed below (COCO terms of use: "
        "https://cocodataset.org/#termsofuse).\n\n"
        "**Annotations** are derived from the COCO annotations (c) COCO Consortium, licensed under "
        "[CC BY 4.0](https://creativecommons.org/licenses/by/4.0/): person boxes only (non-crowd), rewritten as "
        "YOLO `0 cx cy w h` lines; train from `instances_train2017.json`, val from the coco128 YOLO box labels; "
        "person polygons (`labels/segments`, YOLO-seg `0 x1 y1 x2 y2 ...`) from coco128's segment labels.\n\n"
        "| split | file | COCO image id | persons | licence / source |\n|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
    )


if __name__ == "__main__":
    main()
