"""COCO instances JSON reader -> :class:`ImageRecord` list, validated up front."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import DUPLICATE_ID, LENIENT_HINT, MALFORMED_LABEL, SIZE_MISMATCH, UNKNOWN_CLASS, DataError, SkipReport
from .masks import check_polygons, check_rle
from .records import ImageRecord, make_record
from .validate import Checker, check_box, check_image, require_dir


def _load_json(annotations: Path) -> dict:
    if not annotations.is_file():
        raise DataError(f"COCO annotations not found: {annotations}; fix data.<split>.annotations or data.root")
    try:
        with open(annotations, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise DataError(f"invalid COCO JSON {annotations} ({err}); re-export the annotations file") from err
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise DataError(
            f"not a COCO instances file: {annotations} lacks {missing}; point data.<split>.annotations "
            f"at an instances_*.json file"
        )
    return data


def _polygons(segmentation: object, width: int, height: int) -> tuple:
    """COCO polygon list -> tuple of (P, 2) float32 arrays; RLE (a dict) -> () since it has no polygon form."""
    if not isinstance(segmentation, list):
        return ()
    out = []
    for flat in segmentation:
        pts = np.asarray(flat, dtype=np.float32).reshape(-1, 2)
        if len(pts) >= 3:  # COCO has a few 1-2 point "polygons"; they have no area, so dropping them loses nothing
            pts[:, 0] = pts[:, 0].clip(0, width)
            pts[:, 1] = pts[:, 1].clip(0, height)
            out.append(pts)
    return tuple(out)


def read_coco(
    *,
    annotations: Path,
    images: Path,
    class_names: Sequence[str] = ("person",),
    masks: bool = False,
    lenient: bool = False,
) -> tuple[list[ImageRecord], SkipReport]:
    """Read a COCO instances JSON into records, keeping only the categories named in ``class_names``.

    Every image in the JSON becomes a record (images with no kept box are negatives). ``iscrowd=1`` annotations
    are dropped; other categories are not errors, just not kept. Boxes are converted xywh -> xyxy absolute pixels
    and clipped; ``polygons`` holds one entry per kept box (``()`` for RLE masks), ``rles`` the RLE dict of a box
    whose mask is RLE-encoded (else ``None``). With ``masks`` every kept box must have a usable mask: polygons outside
    the image or without area, and RLE masks of another size or empty, are errors (or skips when ``lenient``).

    Raises:
        DataError: on the first problem (missing/corrupt image, bad box, unknown category id, malformed
            annotation) unless ``lenient``; then the bad box or image is skipped and counted in the report.
    """
    annotations, images = Path(annotations), Path(images)
    require_dir(images, what="COCO image folder", fix="fix data.root or data.<split>.images")
    data = _load_json(annotations)
    checker = Checker(lenient=lenient)
    class_names = tuple(class_names)

    try:
        cat_names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"malformed 'categories' in {annotations} ({err!r}); re-export the annotations file") from err
    cat_to_label = {cid: class_names.index(name) for cid, name in cat_names.items() if name in class_names}
    absent = [n for n in class_names if n not in cat_names.values()]
    if absent:
        raise DataError(
            f"class names {absent} are not categories of {annotations} (it has e.g. "
            f"{sorted(cat_names.values())[:5]}); fix data.class_names"
        )

    anns_by_image: dict[int, list[dict]] = {}
    image_ids = set()
    for im in data["images"]:
        image_ids.add(im.get("id") if isinstance(im, dict) else None)
    for ann in data["annotations"]:
        where = f"{annotations} annotation id {ann.get('id')}" if isinstance(ann, dict) else str(annotations)
        if not isinstance(ann, dict) or ann.get("image_id") not in image_ids:
            checker.problem(
                MALFORMED_LABEL, f"annotation refers to an unknown image id in {where}; fix the JSON, or {LENIENT_HINT}"
            )
            continue
        if ann.get("category_id") not in cat_names:
            checker.problem(
                UNKNOWN_CLASS,
                f"unknown category_id {ann.get('category_id')!r} in {where} (not in its "
                f"'categories'); fix the JSON, or {LENIENT_HINT}",
            )
            continue
        anns_by_image.setdefault(ann["image_id"], []).append(ann)

    records: list[ImageRecord] = []
    seen_ids: dict[int, str] = {}
    for im in data["images"]:
        try:
            image_id, file_name = int(im["id"]), str(im["file_name"])
            width, height = int(im["width"]), int(im["height"])
        except (KeyError, TypeError, ValueError) as err:
            checker.problem(
                MALFORMED_LABEL,
                f"malformed image entry {im!r:.80} in {annotations} ({err!r}); fix the JSON, or {LENIENT_HINT}",
            )
            continue
        if image_id in seen_ids:
            # Annotations point at ids: with two images under one id, boxes would be drawn on the wrong picture.
            checker.problem(
                DUPLICATE_ID,
                f"duplicate image id {image_id} in {annotations} ({seen_ids[image_id]} and {file_name}); give each "
                f"image its own id, or {LENIENT_HINT} (the second one is skipped)",
            )
            continue
        seen_ids[image_id] = file_name
        path = images / file_name
        size = check_image(path, checker=checker, listed_in=annotations)
        if size is None:
            continue
        if size != (width, height):
            checker.problem(
                SIZE_MISMATCH,
                f"image {path} is {size[0]}x{size[1]} but {annotations} says "
                f"{width}x{height}; fix the JSON entry or restore the original image, or {LENIENT_HINT}",
            )
            continue
        boxes, labels, polys, rles = [], [], [], []
        for ann in anns_by_image.get(image_id, ()):
            if ann.get("iscrowd", 0) or ann["category_id"] not in cat_to_label:
                continue
            where = f"{annotations} annotation id {ann.get('id')} (image {file_name})"
            try:
                x, y, w, h = (float(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError) as err:
                checker.problem(
                    MALFORMED_LABEL,
                    f"malformed bbox {ann.get('bbox')!r} in {where} ({err!r}); "
                    f"expected [x, y, w, h]; fix the JSON, or {LENIENT_HINT}",
                )
                continue
            box = check_box([x, y, x + w, y + h], width=width, height=height, checker=checker, where=where)
            if box is None:
                continue
            seg = ann.get("segmentation")
            try:
                poly = _polygons(seg, width, height)
                raw = [np.asarray(f, dtype=np.float32).reshape(-1, 2) for f in seg] if isinstance(seg, list) else []
            except (TypeError, ValueError) as err:
                checker.problem(
                    MALFORMED_LABEL, f"malformed segmentation in {where} ({err!r}); fix the JSON, or {LENIENT_HINT}"
                )
                continue
            if masks and not (
                check_rle(seg, width=width, height=height, checker=checker, where=where)
                if isinstance(seg, dict)
                else check_polygons(raw, width=width, height=height, checker=checker, where=where)
            ):
                continue
            boxes.append(box)
            labels.append(cat_to_label[ann["category_id"]])
            polys.append(poly)
            rles.append(seg if isinstance(seg, dict) else None)
        records.append(
            make_record(
                path=path,
                width=width,
                height=height,
                boxes=boxes,
                labels=labels,
                image_id=image_id,
                polygons=polys,
                rles=rles,
            )
        )
    return records, checker.report
