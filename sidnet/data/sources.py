"""Splits made of several sources, and data YAMLs read by path.

A split in a data YAML is either one source (a mapping, as ``conf/data/coco128.yaml``) or a list of them (as
``conf/data/persons.yaml``); each source has its own ``format``, ``root``, ``images``, ``labels`` / ``annotations``
and label mapping, and inherits ``root``, ``class_map`` and ``num_label_classes`` from the data config when it does
not set them (a source's relative ``root`` is inside the data config's ``root`` when that is set). Records keep the
name of the source they came from (``ImageRecord.source``), which is what the per-source evaluation groups by.

Relative roots: the project's own ``conf/data/*.yaml`` are written relative to the project root (Hydra composes
them); any other data YAML read by path (``data=path/to/mine.yaml``, ``--data path/to/mine.yaml``) is relative to
the folder the YAML is in, so a dataset folder can carry its own YAML.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError, SkipReport
from .records import ImageRecord
from .sample import resolve_root

# Keys a source may hold; anything else in a split is a typo and refused.
SOURCE_KEYS = ("name", "format", "root", "images", "annotations", "labels", "class_map", "num_label_classes",
               "polygons", "skip_unlabeled", "box_only", "repeat")  # fmt: skip
DATA_KEYS = ("root", "train", "val", "class_names", "class_map", "num_label_classes", "negative_ratio", "lenient")
YAML_SUFFIXES = (".yaml", ".yml")
# Image ids of source k become k * ID_STRIDE + id in a split of several sources, so ids stay unique (evaluation keys
# on them) and stay put when another source is appended.
ID_STRIDE = 10**12


@dataclass(frozen=True)
class Source:
    """One source of a split, with everything it inherits filled in (``root`` absolute)."""

    name: str
    format: str
    root: Path
    images: str
    annotations: str | None = None
    labels: str | None = None
    class_map: dict[int, int] | None = None
    num_label_classes: int = 80
    polygons: bool = False
    skip_unlabeled: bool = False
    box_only: bool = False  # boxes without instance masks: a mask task trains only its box heads on these images
    repeat: int = 1  # train: each image of this source is shown this many times per epoch (oversample a small source)


def _as_dict(node: Any, where: str) -> dict[str, Any]:
    if dataclasses.is_dataclass(node):
        node = dataclasses.asdict(node)
    if not isinstance(node, Mapping):
        raise DataError(f"{where} must be a mapping (format, images, labels/annotations ...) or a list of them, "
                        f"got {type(node).__name__}")  # fmt: skip
    return dict(node)


def split_sources(
    split: Any,
    *,
    split_name: str,
    root: str | Path | None,
    base: Path,
    class_map: Mapping[int, int] | None,
    num_label_classes: int,
) -> list[Source]:
    """A split of a data config (one mapping or a list of mappings) → its sources.

    Args:
        split: ``data.train`` / ``data.val``: a mapping or dataclass (one source), or a list of them.
        split_name: for messages and default names.
        root: ``data.root``, inherited by sources without their own (``None``: the bundled sample).
        base: what relative roots are relative to (the project root for ``conf/data``, else the YAML's folder).
        class_map, num_label_classes: the data-level values sources inherit.

    Raises:
        DataError: an empty list, an unknown key, a missing ``images``/``format``, or two sources with one name.
    """
    where = f"data.{split_name}"
    if split is None:
        raise DataError(f"{where} is missing; give it a source (format, images, labels/annotations) or a list of them")
    many = isinstance(split, Sequence) and not isinstance(split, (str, bytes))
    items = list(split) if many else [split]
    if not items:
        raise DataError(f"{where} is an empty list; give it at least one source")
    sources = []
    for k, item in enumerate(items):
        here = f"{where}[{k}]" if many else where
        d = {key: value for key, value in _as_dict(item, here).items() if value is not None}
        unknown = sorted(set(d) - set(SOURCE_KEYS))
        if unknown:
            raise DataError(f"{here} has unknown key(s) {unknown}; a source takes {list(SOURCE_KEYS)}")
        if "format" not in d and ("annotations" in d) != ("labels" in d):  # the one it names is the format
            d["format"] = "coco" if "annotations" in d else "yolo"
        for key in ("format", "images"):
            if key not in d:
                raise DataError(f"{here} needs '{key}' (e.g. format: yolo, images: images/train, labels: "
                                "labels/train; or format: coco with annotations: a.json)")
        # A source's own relative root is inside the data root when there is one (root: ../shared/data, then
        # root: coco128 per source), else relative to base.
        parent = base if root is None or "root" not in d else resolve_root(root, base=base)
        src_root = resolve_root(d.get("root", root), base=parent)
        name = str(d.get("name") or (src_root.name if many else split_name))
        repeat = d.get("repeat", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise DataError(f"{here}.repeat = {repeat!r}: give a whole number >= 1 (how many times an epoch shows each "
                            "image of this source)")  # fmt: skip
        sources.append(Source(name=name, format=str(d["format"]), root=src_root, images=str(d["images"]),
                              annotations=d.get("annotations"), labels=d.get("labels"),
                              class_map=dict(d.get("class_map", class_map) or {}) or None,
                              num_label_classes=int(d.get("num_label_classes", num_label_classes)),
                              polygons=bool(d.get("polygons", False)),
                              skip_unlabeled=bool(d.get("skip_unlabeled", False)),
                              box_only=bool(d.get("box_only", False)), repeat=repeat))  # fmt: skip
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{where} has several sources named {dupes}; give each a distinct 'name:'")
    return sources


def load_sources(
    sources: Sequence[Source], *, class_names: Sequence[str], masks: bool = False, lenient: bool = False
) -> tuple[list[ImageRecord], dict[str, SkipReport]]:
    """Read every source (validated, one-line :class:`DataError` on bad input) and concatenate the records, each
    tagged with its source's name; with several sources, image ids are offset by ``k * ID_STRIDE`` (source k)."""
    # The readers pull in OpenCV and pycocotools: imported here, so that checking a data YAML (python -m train
    # data=<file>, before anything else runs) stays light.
    from .splits import load_split

    records, reports = [], {}
    for k, s in enumerate(sources):
        recs, report = load_split(format=s.format, root=s.root, images=s.images, annotations=s.annotations,
                                  labels=s.labels, class_names=tuple(class_names), class_map=s.class_map,
                                  polygons=s.polygons, skip_unlabeled=s.skip_unlabeled, masks=masks and not s.box_only,
                                  num_label_classes=s.num_label_classes, lenient=lenient)  # fmt: skip
        offset = k * ID_STRIDE if len(sources) > 1 else 0
        if offset and any(not 0 <= r.image_id < ID_STRIDE for r in recs):
            raise DataError(f"source {s.name!r} has image ids outside [0, {ID_STRIDE}); rename its files or use "
                            "COCO ids below that")  # fmt: skip
        records += [dataclasses.replace(r, source=s.name, image_id=r.image_id + offset, box_only=s.box_only,
                                        repeat=s.repeat) for r in recs]  # fmt: skip
        reports[s.name] = report
    return records, reports


def is_data_file(value: str) -> bool:
    """True when a ``data=`` / ``--data`` value names a YAML file rather than a config in ``conf/data``."""
    return str(value).lower().endswith(YAML_SUFFIXES)


def rebase_roots(data: Mapping[str, Any], *, base: Path) -> dict[str, Any]:
    """``data`` with every relative root (data-level and per source) made absolute against ``base``; a null data
    root stays null (the bundled sample)."""

    def fix(root):
        return None if root is None else str(resolve_root(root, base=base))

    out = dict(data)
    if out.get("root") is not None:  # sources' own roots are inside it (split_sources): leave them relative
        out["root"] = fix(out["root"])
        return out
    for split in ("train", "val"):
        node = out.get(split)
        if isinstance(node, Sequence) and not isinstance(node, (str, bytes)):
            out[split] = [{**s, "root": fix(s["root"])} if isinstance(s, Mapping) and s.get("root") else s
                          for s in node]  # fmt: skip
        elif isinstance(node, Mapping) and node.get("root"):
            out[split] = {**node, "root": fix(node["root"])}
    return out


def read_data_yaml(path: str | Path, *, project_root: Path) -> dict[str, Any]:
    """A data YAML read by path → a plain dict with absolute roots (see the module docstring for what relative roots
    are relative to). Interpolations are resolved with the resolvers already registered (the entry points register
    ``sidnet.resolvers``).

    Raises:
        DataError: the file is missing, is not YAML, is not a mapping, has keys a data config does not take, or has
            no split (a split it lacks is an error where it is used, e.g. ``data.val is missing``).
    """
    from omegaconf import OmegaConf

    from sidnet.safety import load_yaml, refuse_env_interpolations

    path = Path(path).expanduser()
    if not path.exists() and not path.is_symlink():  # a FIFO or a folder is refused by load_yaml, by name
        raise DataError(f"data YAML not found: {path}; pass an existing file (relative to the current folder) or a "
                        "name from conf/data/")  # fmt: skip
    # Read as data: a regular file, bounded, few YAML aliases, no ${oc.env:...} (a secret never becomes a path).
    raw = load_yaml(path, what="data YAML", fix="pass a YAML like those in conf/data/")
    refuse_env_interpolations(raw, where=str(path))
    try:
        data = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    except Exception as e:  # noqa: BLE001  (yaml and OmegaConf raise many types; the message is what matters)
        raise DataError(f"data YAML {path} does not parse: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(data, dict):
        raise DataError(f"data YAML {path} must be a mapping with at least 'train' and 'val'")
    unknown = sorted(set(data) - set(DATA_KEYS))
    if unknown:
        raise DataError(f"data YAML {path} has unknown key(s) {unknown}; a data config takes {list(DATA_KEYS)}")
    if "train" not in data and "val" not in data:
        raise DataError(f"data YAML {path} has neither a 'train' nor a 'val' split; add them (a source or a list)")
    path = path.resolve()
    own = path.parent == (Path(project_root) / "conf" / "data").resolve()
    return rebase_roots(data, base=Path(project_root) if own else path.parent)

