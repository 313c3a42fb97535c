"""Data YAMLs (``conf/data/*.yaml``) → :class:`~sidnet.config.DataConfig`, for every caller outside Hydra
(``python -m train.evaluate --data``, the INT8 export's ``--calib-data`` / ``--gate-data``, QAT's
``quant.calib_data``)."""

from __future__ import annotations

from pathlib import Path

from sidnet.config import DataConfig, SplitConfig
from sidnet.resolvers import register_resolvers


def data_config(d: dict) -> DataConfig:
    """A plain data config (a checkpoint's ``config["data"]``, a loaded YAML) as the dataclass."""
    d = dict(d)
    for split in ("train", "val"):
        d[split] = SplitConfig(**d[split])
    return DataConfig(**d)


def load_data_yaml(path: Path, *, project_root: Path) -> DataConfig:
    """A conf/data/*.yaml, its interpolations (e.g. data=auto's ``${shared_or_sample:…}``, relative to
    ``project_root``) resolved."""
    from omegaconf import OmegaConf

    register_resolvers(project_root=project_root)
    return data_config(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
