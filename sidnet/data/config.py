"""Data YAMLs → :class:`~sidnet.config.DataConfig`, for every caller outside Hydra (``python -m train.evaluate
--data``, ``python -m train.anchors --data``, the INT8 export's ``--calib-data`` / ``--gate-data``, QAT's
``quant.calib_data``). The project's ``conf/data/*.yaml`` and your own files alike; relative roots resolve as
:mod:`sidnet.data.sources` says (your file: against its own folder)."""

from __future__ import annotations

from pathlib import Path

from sidnet.config import ConfigError, DataConfig
from sidnet.data.sources import read_data_yaml
from sidnet.resolvers import register_resolvers


def data_config(d: dict) -> DataConfig:
    """A plain data config (a checkpoint's ``config["data"]``, a loaded YAML) as the dataclass; an unknown key is a
    one-line error. The splits stay plain (one source or a list): :func:`sidnet.data.sources.split_sources` checks
    them."""
    try:
        return DataConfig(**d)
    except TypeError as e:
        raise ConfigError(f"data config: {e}; see sidnet/config.py DataConfig for the keys") from None


def load_data_yaml(path: str | Path, *, project_root: Path) -> DataConfig:
    """A data YAML by path, its interpolations (e.g. data=auto's ``${auto_data:…}``, relative to ``project_root``)
    resolved and its relative roots made absolute. Raises DataError (one line) for a missing or malformed file."""
    register_resolvers(project_root=project_root)
    return data_config(read_data_yaml(path, project_root=project_root))
