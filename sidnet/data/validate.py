"""Up-front checks shared by the readers: image files, box geometry, and the strict/lenient switch.

Readers validate everything before training starts, so a bad dataset fails in seconds with a one-line message
instead of hours into an epoch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from .errors import (
    BOX_OUTSIDE_IMAGE,
    CORRUPT_IMAGE,
    EMPTY_BOX,
    LENIENT_HINT,
    MALFORMED_LABEL,
    MISSING_IMAGE,
    TOO_LARGE,
    DataError,
    SkipReport,
)

# Decoded frames are held whole (H x W x 3 bytes) before letterboxing: this caps one at ~192 MiB. 8K video is 33 MP.
MAX_IMAGE_PIXELS = 64_000_000
BOX_TOLERANCE_PX = 1.0  # annotation tools round to whole pixels; beyond this a box is wrong, not sloppy
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_JPEG_TAIL_BYTES = 1024


class Checker:
    """Routes one problem either to an exception (strict) or to the skip report (lenient).

    Readers call :meth:`problem`; when it returns (lenient mode) they drop the offending box or image.
    """

    def __init__(self, *, lenient: bool, report: SkipReport | None = None) -> None:
        self.lenient = lenient
        self.report = report if report is not None else SkipReport()

    def problem(self, reason: str, message: str) -> None:
        """Raise ``DataError(message)`` unless lenient; in lenient mode count it under ``reason`` and return."""
        if not self.lenient:
            raise DataError(message)
        self.report.add(reason, message)


def _jpeg_truncated(path: Path) -> bool:
    # PIL's verify() does not decode JPEG scan data, so a cut-off download passes it and later decodes as a grey
    # half-image. Scan data byte-stuffs 0xFF, so an end-of-image marker near the tail is a cheap, reliable check.
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - _JPEG_TAIL_BYTES))
        return b"\xff\xd9" not in f.read()


def check_image(path: Path, *, checker: Checker, listed_in: Path | str | None = None) -> tuple[int, int] | None:
    """Check that ``path`` exists and is a readable image, without decoding its pixels.

    Returns:
        ``(width, height)`` of the raw pixel data, or ``None`` when the image was skipped (lenient mode).
    """
    where = f" (listed in {listed_in})" if listed_in is not None else ""
    if not path.is_file():
        checker.problem(MISSING_IMAGE, f"image not found: {path}{where}; fix the path or {LENIENT_HINT}")
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below is the policy
            with Image.open(path) as im:
                size = im.size
                fmt = im.format
                im.verify()
        if fmt == "JPEG" and _jpeg_truncated(path):
            raise OSError("JPEG end-of-image marker missing, the file is truncated")
    except Image.DecompressionBombError:
        size = None
    except Exception as err:  # PIL raises a zoo of types (UnidentifiedImageError, OSError, SyntaxError, ...)
        checker.problem(
            CORRUPT_IMAGE,
            f"corrupt or unreadable image: {path}{where} ({type(err).__name__}: {err}); "
            f"replace or delete the file, or {LENIENT_HINT}",
        )
        return None
    if size is None or size[0] * size[1] > MAX_IMAGE_PIXELS:
        shown = f"{size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.0f} MP)" if size else "larger than PIL's bomb limit"
        checker.problem(
            TOO_LARGE,
            f"image {path}{where} is {shown}, over the {MAX_IMAGE_PIXELS / 1e6:.0f} MP that bounds decoding memory "
            f"(a {MAX_IMAGE_PIXELS * 3 / 2**20:.0f} MiB frame per loader worker); downscale it (normalised YOLO "
            f"labels stay valid; scale COCO boxes with it), or {LENIENT_HINT}",
        )
        return None
    return int(size[0]), int(size[1])


def _fmt_box(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in box) + "]"


def check_box(box: Sequence[float], *, width: int, height: int, checker: Checker, where: str) -> list[float] | None:
    """Validate one xyxy box in absolute pixels and clip it to the image.

    Boxes up to ``BOX_TOLERANCE_PX`` outside the image are clipped silently; beyond that they are an error.

    Returns:
        The clipped ``[x1, y1, x2, y2]``, or ``None`` when the box was skipped (lenient mode).
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        checker.problem(MALFORMED_LABEL, f"non-finite box {_fmt_box(box)} in {where}; fix the label, or {LENIENT_HINT}")
        return None
    if x2 <= x1 or y2 <= y1:
        checker.problem(
            EMPTY_BOX,
            f"zero-area or negative box {_fmt_box(box)} (xyxy px) in {where}; fix or delete it, or {LENIENT_HINT}",
        )
        return None
    tol = BOX_TOLERANCE_PX
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        checker.problem(
            BOX_OUTSIDE_IMAGE,
            f"box {_fmt_box(box)} (xyxy px) lies outside the {width}x{height} image in {where} "
            f"(tolerance {tol:g} px); fix the label, or {LENIENT_HINT}",
        )
        return None
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if x2 <= x1 or y2 <= y1:  # a sliver entirely inside the tolerance band clips to nothing
        checker.problem(
            EMPTY_BOX,
            f"box {_fmt_box(box)} (xyxy px) in {where} has no area inside the {width}x{height} image; "
            f"fix or delete it, or {LENIENT_HINT}",
        )
        return None
    return [x1, y1, x2, y2]


def require_dir(path: Path, *, what: str, fix: str) -> None:
    """Raise a one-line :class:`DataError` when a configured folder is missing (never lenient: it is a config bug)."""
    if not path.is_dir():
        raise DataError(f"{what} not found: {path}; {fix}")


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (case-insensitive suffix match), sorted by name for stable ids."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
