"""Where the bundled sample dataset lives, so the project runs without ``../shared``."""

from __future__ import annotations

from pathlib import Path

_SAMPLE = Path(__file__).resolve().parents[1] / "sample"


def sample_root() -> Path:
    """Root of the bundled sample, in coco128's YOLO layout (person = 0, the only label written).

    ``images/{train2017,val2017}/*.jpg`` and ``labels/boxes/{train2017,val2017}/*.txt``; 8 train (2 negatives) and
    4 val (1 negative) COCO images, see ``ATTRIBUTION.md``.

    Resolved from this file rather than ``importlib.resources`` because the readers need a real directory, and
    setuptools installs ``sidnet/sample/**`` as plain package data next to the code.
    """
    return _SAMPLE


def resolve_root(root: str | Path | None, *, base: Path) -> Path:
    """Config ``data.root`` -> absolute path: ``None`` is the bundled sample, a relative path is ``base / root``."""
    if root is None:
        return sample_root()
    root = Path(root).expanduser()
    return root if root.is_absolute() else (base / root).resolve()
