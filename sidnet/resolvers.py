"""OmegaConf resolvers the configs use; registered by the entry points only."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("sidnet.data")

# data=auto's preference: the first whose folders all exist under ../shared/data (sample: always).
AUTO_DATA = (("persons", ("coco128", "capston2", "cctv")), ("coco128", ("coco128",)), ("sample", ()))
SHARED_DATA = "../shared/data"


def shared_or_sample(path: str, *, project_root: Path) -> str | None:
    """``path`` (relative to the project root) if it exists, else None = the bundled sample. Logged either way,
    since the two give different results."""
    p = Path(path)
    p = p if p.is_absolute() else project_root / p
    if p.is_dir():
        log.info("data: %s", p)
        return str(p)
    log.warning("data: %s not found, using the bundled sample (sidnet/sample); pass data=coco128 to require it", p)
    return None


@functools.cache
def auto_data_name(project_root: Path) -> str:
    """Which ``conf/data`` config ``data=auto`` stands for on this machine (see :data:`AUTO_DATA`), logged once."""
    shared = project_root / SHARED_DATA
    name, folders = next((n, f) for n, f in AUTO_DATA if all((shared / d).is_dir() for d in f))
    if name == "sample":
        log.warning("data=auto: %s holds no coco128, using the bundled sample (sidnet/sample)", shared.resolve())
    else:
        log.info("data=auto: conf/data/%s.yaml (%s holds %s)", name, shared.resolve(), ", ".join(folders))
    return name


@functools.cache
def _data_yaml(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def auto_data(key: str, *, project_root: Path) -> Any:
    """``data.<key>`` of the config ``data=auto`` picks (:func:`auto_data_name`); roots stay relative to the project
    root, as in every ``conf/data`` file."""
    return _data_yaml(project_root / "conf" / "data" / f"{auto_data_name(project_root)}.yaml").get(key)


def register_resolvers(*, project_root: Path) -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver(
        "shared_or_sample",
        lambda path: shared_or_sample(path, project_root=project_root),
        replace=True,
        use_cache=True,  # resolved once per run: one log line, and the choice cannot change mid-run
    )
    OmegaConf.register_new_resolver("auto_data", lambda key: auto_data(key, project_root=project_root), replace=True)
