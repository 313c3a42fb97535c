"""``python -m train``: the Hydra entry point. Everything below ``train(cfg)`` takes plain arguments."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sidnet.config import TrainConfig, register_configs
from sidnet.data.errors import DataError
from sidnet.engine.checkpoint import CheckpointError
from sidnet.resolvers import register_resolvers

PROJECT_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("sidnet.train")

register_configs()
register_resolvers(project_root=PROJECT_ROOT)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from sidnet.engine.trainer import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    config: TrainConfig = OmegaConf.to_object(cfg)
    try:
        summary = train(config, run_dir=run_dir, project_root=PROJECT_ROOT)
    except (DataError, CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        # Bad input is the user's to fix: one line, no traceback.
        raise SystemExit(f"error: {e}") from None
    log.info("done: %d epochs, best AP50 %.4f, checkpoints in %s", summary["epochs"], summary["best_ap50"], run_dir)


if __name__ == "__main__":
    main()
