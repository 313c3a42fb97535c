"""``load_split``: one config entry (format + relative paths) -> validated records."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from .coco import read_coco
from .errors import DataError, SkipReport
from .records import ImageRecord
from .yolo import read_yolo

FORMATS = ("coco", "yolo")


def load_split(
    *,
    format: str,
    root: Path,
    images: str,
    annotations: str | None = None,
    labels: str | None = None,
    class_names: Sequence[str] = ("person",),
    class_map: Mapping[int, int] | None = None,
    num_label_classes: int = 80,
    polygons: bool = False,
    skip_unlabeled: bool = False,
    masks: bool = False,
    lenient: bool = False,
) -> tuple[list[ImageRecord], SkipReport]:
    """Read one split described by a ``conf/data/*.yaml`` entry; paths are relative to ``root``.

    ``format="coco"`` needs ``annotations`` (``class_names`` picks the categories; ``class_map`` is unused);
    ``format="yolo"`` needs ``labels`` (``class_map`` maps label ids to class indices, default ``{0: 0}``;
    ``polygons`` / ``skip_unlabeled`` as in :func:`read_yolo`). ``masks``: every kept box needs a valid mask.
    Accepts OmegaConf containers for ``class_names`` / ``class_map``.

    Raises:
        DataError: unknown format, missing root or path key, or any reader error (see the readers).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root not found: {root}; fix data.root, or use data=sample for the bundled sample")
    if format == "coco":
        if not annotations:
            raise DataError(f"format 'coco' needs an annotations path (images: {images}); set data.<split>.annotations")
        return read_coco(
            annotations=root / annotations,
            images=root / images,
            class_names=tuple(class_names),
            masks=masks,
            lenient=lenient,
        )
    if format == "yolo":
        if not labels:
            raise DataError(f"format 'yolo' needs a labels folder (images: {images}); set data.<split>.labels")
        return read_yolo(
            images=root / images,
            labels=root / labels,
            class_map=None if class_map is None else dict(class_map),
            num_label_classes=num_label_classes,
            polygons=polygons,
            masks=masks,
            skip_unlabeled=skip_unlabeled,
            lenient=lenient,
        )
    raise DataError(f"unknown data format {format!r}; set data.<split>.format to one of {list(FORMATS)}")


def parse_split(spec: str) -> tuple[str, int, int]:
    """``"val"`` → ("val", 0, 1); ``"val:1/2"`` → ("val", 1, 2): part K of N of a split (see :func:`split_part`)."""
    name, sep, part = str(spec).partition(":")
    if not sep:
        return name, 0, 1
    k, slash, n = part.partition("/")
    if slash and k.isdigit() and n.isdigit() and 0 <= int(k) < int(n):
        return name, int(k), int(n)
    raise DataError(f"split {spec!r} is not NAME or NAME:K/N with 0 <= K < N (e.g. val:0/2 and val:1/2 halve val)")


def split_part(records: Sequence[ImageRecord], part: int, parts: int) -> list[ImageRecord]:
    """The records whose image id hashes to ``part`` of ``parts``: a deterministic partition that depends on each
    image's id alone (not on order or on which other images exist), so ``val:0/2`` and ``val:1/2`` are disjoint,
    cover ``val`` and stay put when images are added."""
    if parts == 1:
        return list(records)
    pick = lambda r: int.from_bytes(hashlib.sha256(str(r.image_id).encode()).digest()[:8], "big") % parts  # noqa: E731
    return [r for r in records if pick(r) == part]
