"""Data YAMLs (``conf/data/*.yaml``) → :class:`~sidnet.config.DataConfig`, for every caller outside Hydra
(``python -m train.evaluate --data``, the INT8 export's ``--calib-data`` / ``--gate-data``, QAT's
``quant.calib_data``)."""

from __future__ import annotations

from pathlib import Path

from sidnet.config import DataConfig, SplitConfig
from sidnet.resolvers import register_resolvers
from sidnet.safety import load_yaml, refuse_env_interpolations


def data_config(d: dict) -> DataConfig:
    """A plain data config (a checkpoint's ``config["data"]``, a loaded YAML) as the dataclass (``KeyError`` /
    ``TypeError`` when it is not one)."""
    d = dict(d)
    for split in ("train", "val"):
        d[split] = SplitConfig(**d[split])
    return DataConfig(**d)


def load_data_yaml(path: Path, *, project_root: Path) -> DataConfig:
    """A conf/data/*.yaml, its interpolations (e.g. data=auto's ``${shared_or_sample:…}``, relative to
    ``project_root``) resolved."""
    from omegaconf import OmegaConf

    register_resolvers(project_root=project_root)
    # Read as data: a regular file, bounded, few YAML aliases, no ${oc.env:...} (a secret never becomes a path).
    raw = load_yaml(path, what="data config", fix="pass a YAML like those in conf/data/")
    if not isinstance(raw, dict) or not {"train", "val"} <= set(raw):
        raise ValueError(f"data config {path} is not a mapping with train: and val: splits; see conf/data/sample.yaml")
    refuse_env_interpolations(raw, where=str(path))
    try:
        return data_config(OmegaConf.to_container(OmegaConf.create(raw), resolve=True))
    except Exception as e:  # noqa: BLE001  (OmegaConf and the dataclasses raise many types for one bad key)
        raise ValueError(f"data config {path}: {' '.join(str(e).split())[:200]}; see conf/data/sample.yaml") from e
