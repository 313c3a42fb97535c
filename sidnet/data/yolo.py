"""YOLO txt label reader (``cls cx cy w h`` boxes or ``cls x1 y1 x2 y2 ...`` polygons) -> :class:`ImageRecord`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sidnet.safety import one_line, read_text

from .errors import LENIENT_HINT, MALFORMED_LABEL, ORPHAN_LABEL, UNKNOWN_CLASS, DataError, SkipReport
from .masks import check_polygons
from .records import ImageRecord, make_record
from .validate import Checker, check_box, check_image, list_images, require_dir


def _image_ids(image_files: list[Path]) -> list[int]:
    # COCO-style names (000000000139.jpg) keep their COCO id so YOLO and COCO views of one image agree; any other
    # naming falls back to the sorted position, applied to all files so ids cannot collide.
    stems = [p.stem for p in image_files]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(len(stems)))


def _check_class_map(class_map: Mapping[int, int], num_label_classes: int) -> dict[int, int]:
    out = {int(k): int(v) for k, v in class_map.items()}
    bad = [k for k in out if not 0 <= k < num_label_classes]
    if bad or any(v < 0 for v in out.values()):
        raise DataError(
            f"data.class_map {out} has label ids outside [0, {num_label_classes}) or negative class "
            f"indices; fix data.class_map or data.num_label_classes"
        )
    return out


def _parse_line(
    fields: list[str], *, polygons: bool, num_label_classes: int, checker: Checker, where: str
) -> tuple[int, np.ndarray] | None:
    """One label line -> (label id, coordinates as (N, 2) normalised points); None when skipped."""
    n = len(fields)
    if (not polygons and n != 5) or (polygons and (n < 7 or n % 2 == 0)):
        expected = "'cls x1 y1 x2 y2 ...' (>= 3 points)" if polygons else "'cls cx cy w h' (5 fields)"
        checker.problem(
            MALFORMED_LABEL,
            f"malformed label line in {where}: expected {expected}, got {n} fields; fix the line, or {LENIENT_HINT}",
        )
        return None
    try:
        cls_f = float(fields[0])
        coords = np.asarray([float(v) for v in fields[1:]], dtype=np.float64).reshape(-1, 2)
        if not cls_f.is_integer():
            raise ValueError(f"class id {fields[0]!r} is not an integer")
    except ValueError as err:
        checker.problem(MALFORMED_LABEL, f"malformed label line in {where} ({err}); fix the line, or {LENIENT_HINT}")
        return None
    cls = int(cls_f)
    if not 0 <= cls < num_label_classes:
        checker.problem(
            UNKNOWN_CLASS,
            f"unknown class id {cls} in {where} (expected 0..{num_label_classes - 1}); "
            f"fix the label or data.num_label_classes, or {LENIENT_HINT}",
        )
        return None
    return cls, coords


def _read_labels(
    label_file: Path,
    *,
    width: int,
    height: int,
    class_map: dict[int, int],
    num_label_classes: int,
    polygons: bool,
    masks: bool,
    checker: Checker,
) -> tuple[list, list, list] | None:
    """Parse one label file into kept (boxes, labels, polygons) in absolute pixels; None if the file is unreadable."""
    try:
        text = read_text(label_file, kind="label", what="label file")  # regular files only: a FIFO never blocks
    except (OSError, ValueError) as err:
        checker.problem(
            MALFORMED_LABEL,
            f"unreadable label file {label_file} ({type(err).__name__}: {one_line(err)[:160]}); fix or delete it, "
            f"or {LENIENT_HINT}",
        )
        return None
    boxes, labels, polys = [], [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{label_file} line {lineno}"
        parsed = _parse_line(
            fields, polygons=polygons, num_label_classes=num_label_classes, checker=checker, where=where
        )
        if parsed is None or parsed[0] not in class_map:  # ids outside class_map are other classes, not errors
            continue
        cls, pts = parsed
        pts = pts * (width, height)
        if polygons:
            box = [*pts.min(axis=0), *pts.max(axis=0)]
        else:
            (cx, cy), (w, h) = pts
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        box = check_box(box, width=width, height=height, checker=checker, where=where)
        if box is None:
            continue
        if masks and not check_polygons([pts], width=width, height=height, checker=checker, where=where):
            continue
        boxes.append(box)
        labels.append(class_map[cls])
        if polygons:
            polys.append((np.clip(pts, 0, (width, height)).astype(np.float32),))
    return boxes, labels, polys


def read_yolo(
    *,
    images: Path,
    labels: Path,
    class_map: Mapping[int, int] | None = None,
    num_label_classes: int = 80,
    polygons: bool = False,
    masks: bool = False,
    skip_unlabeled: bool = False,
    lenient: bool = False,
) -> tuple[list[ImageRecord], SkipReport]:
    """Read YOLO-format labels into one record per image file in ``images`` (jpg/jpeg/png/bmp/webp).

    ``labels/<stem>.txt`` holds normalised ``cls cx cy w h`` lines (or ``cls x1 y1 ...`` polygons when
    ``polygons``; the box is then the polygon's extent). A missing label file means a negative image; label ids in
    ``[0, num_label_classes)`` but not in ``class_map`` (default ``{0: 0}``) are other classes and dropped; a label
    file without an image is ignored and counted as ``orphan_label``. Image sizes come from the file header.
    ``skip_unlabeled=True`` drops images without a label file instead (for label sets that cover only a subset of
    the images, e.g. coco128's ``labels/segments`` with ``skip_if_label_file_missing: true``). ``masks`` (needs
    ``polygons``) also rejects polygons without area (degenerate) as one-line errors, or skips them when ``lenient``.

    Raises:
        DataError: on the first problem unless ``lenient`` (then the bad line or image is skipped and counted);
            always for a missing folder, an empty image folder, or label files none of which match an image.
    """
    images, labels = Path(images), Path(labels)
    require_dir(images, what="YOLO image folder", fix="fix data.root or data.<split>.images")
    require_dir(labels, what="YOLO label folder", fix="fix data.root or data.<split>.labels")
    if masks and not polygons:
        raise DataError(f"masks need polygon labels: set data.<split>.polygons=true for {labels}")
    class_map = _check_class_map({0: 0} if class_map is None else class_map, num_label_classes)
    checker = Checker(lenient=lenient)

    image_files = list_images(images)
    if not image_files:
        raise DataError(f"no images (jpg/jpeg/png/bmp/webp) in {images}; fix data.root or data.<split>.images")
    label_files = {p.stem: p for p in labels.glob("*.txt")}
    stems = {p.stem for p in image_files}
    for stem in sorted(set(label_files) - stems):
        checker.report.add(ORPHAN_LABEL, f"label file without image ignored: {label_files[stem]}")
    if label_files and not stems & set(label_files):
        # Every image would silently become a negative: almost surely the wrong labels folder.
        checker.problem(
            MALFORMED_LABEL,
            f"no label file in {labels} matches an image in {images}; fix data.<split>.labels, or {LENIENT_HINT}",
        )

    records: list[ImageRecord] = []
    for path, image_id in zip(image_files, _image_ids(image_files), strict=True):
        label_file = label_files.get(path.stem)
        if label_file is None and skip_unlabeled:
            continue
        size = check_image(path, checker=checker)
        if size is None:
            continue
        width, height = size
        boxes, kept_labels, polys = [], [], []
        if label_file is not None:
            parsed = _read_labels(
                label_file,
                width=width,
                height=height,
                class_map=class_map,
                num_label_classes=num_label_classes,
                polygons=polygons,
                masks=masks,
                checker=checker,
            )
            if parsed is None:  # unreadable labels: treating the image as background would teach a wrong lesson
                continue
            boxes, kept_labels, polys = parsed
        records.append(
            make_record(
                path=path,
                width=width,
                height=height,
                boxes=boxes,
                labels=kept_labels,
                image_id=image_id,
                polygons=polys if polygons else None,
            )
        )
    return records, checker.report
