"""OmegaConf resolvers the configs use; registered by the entry points only."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("sidnet.data")


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


def register_resolvers(*, project_root: Path) -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver(
        "shared_or_sample",
        lambda path: shared_or_sample(path, project_root=project_root),
        replace=True,
        use_cache=True,  # resolved once per run: one log line, and the choice cannot change mid-run
    )
