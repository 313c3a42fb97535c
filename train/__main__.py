"""``python -m train [-v] [group=option ...] [key=value ...]``: compose ``conf/train.yaml`` with Hydra, then train.

Hydra's compose API rather than ``@hydra.main``, so that this entry point owns the order of events: every override is
checked (unknown keys, wrong types, out-of-range values) before anything is written; the run folder is locked before
its files are touched (a second training into the same ``runs/<name>`` refuses instead of interleaving); and every
failure ends with one ``error: ...`` line (``-v``: the traceback). The run folder gets what ``@hydra.main`` wrote:
``config.yaml`` (resolved), ``.hydra/{config,overrides}.yaml`` and ``train.log``. ``hydra.run.dir=PATH`` still picks
the folder (default ``runs/${name}``, relative to the working directory). Everything below ``train(cfg)`` takes plain
arguments.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from sidnet.cli import TRAIN_INTERRUPTED, pop_verbose, run_guarded
from sidnet.safety import UnsafeInputError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("sidnet.train")
EXAMPLES = "python -m train model=sidnet epochs=50 | python -m train name=x resume=true"
USAGE = __doc__.split("\n\n")[0] + f"\nExamples: {EXAMPLES}"


def compose(overrides: list[str]):
    """conf/train.yaml + overrides → (TrainConfig, resolved DictConfig, run folder). Raises on any bad override."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from sidnet.config import register_configs
    from sidnet.resolvers import register_resolvers
    from sidnet.safety import refuse_env_interpolations

    register_configs()
    register_resolvers(project_root=PROJECT_ROOT)
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides, return_hydra_config=True)
    raw = OmegaConf.to_container(cfg, resolve=False)  # before anything is resolved: no env var is ever read
    run_paths = {k: raw["hydra"][k] for k in ("run", "sweep")}
    refuse_env_interpolations({**{k: v for k, v in raw.items() if k != "hydra"}, "hydra": run_paths},
                              where="the training config")  # fmt: skip
    run_dir = Path(str(cfg.hydra.run.dir))
    with open_dict(cfg):
        del cfg["hydra"]
    return OmegaConf.to_object(cfg), cfg, run_dir


def _bad_config(e: Exception) -> ValueError:
    text = str(e) + (f"\n{e.__cause__}" if e.__cause__ is not None else "")
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    head = lines[0] if lines else type(e).__name__
    hint = next((ln for ln in lines[1:] if ln.startswith(("To append", "Value '", "Key '"))), "")
    hint = f"; {hint}" if hint else ""
    return ValueError(f"bad configuration: {head}{hint} (see conf/train.yaml and sidnet/config.py)")


def run(overrides: list[str]) -> dict:
    from omegaconf import OmegaConf

    from sidnet.config import validate_train_config
    from sidnet.io import atomic_write_text
    from sidnet.safety import claim_run_dir

    try:
        config, cfg, run_dir = compose(overrides)
    except UnsafeInputError:
        raise
    except Exception as e:  # noqa: BLE001  (Hydra/OmegaConf raise many types for one bad override)
        raise _bad_config(e) from e
    validate_train_config(config)  # names, ranges and the run folder first: answered before torch is imported
    claim_run_dir(run_dir, create=False)
    from sidnet.engine.runlock import acquire_run_lock
    from sidnet.engine.trainer import check_run_dir, check_train_config, train

    check_train_config(config, project_root=PROJECT_ROOT)  # nothing is written before the config is known good
    claim_run_dir(run_dir)  # new, empty or a run of ours: never an unrelated folder's config.yaml
    acquire_run_lock(run_dir)
    check_run_dir(run_dir, resume=config.resume)  # a refused start must not overwrite the run's config.yaml
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_text(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))
    atomic_write_text(run_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    summary = train(config, run_dir=run_dir, project_root=PROJECT_ROOT)
    log.info("done: %d epochs, best AP50 %.4f, checkpoints in %s", summary["epochs"], summary["best_ap50"], run_dir)
    return summary


def main(argv: list[str] | None = None) -> dict:
    argv, verbose = pop_verbose(sys.argv[1:] if argv is None else list(argv))
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        raise SystemExit(0)
    flags = [a for a in argv if a.startswith("-")]
    if flags:
        raise SystemExit(f"error: unknown flag(s) {' '.join(flags)}: python -m train takes -v and key=value overrides")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")  # fmt: skip
    return run_guarded(lambda: run(argv), verbose=verbose, interrupted=TRAIN_INTERRUPTED)


if __name__ == "__main__":
    main()
