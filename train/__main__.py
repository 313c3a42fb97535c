"""``python -m train [-v] [-q] [--json] [group=option ...] [key=value ...]``: compose ``conf/train.yaml``, then train.

Hydra's compose API rather than ``@hydra.main``, so that this entry point owns the order of events: every override is
checked (unknown keys, wrong types, out-of-range values) before anything is written; the run folder is locked before
its files are touched (a second training into the same ``runs/<name>`` refuses instead of interleaving); and every
failure ends with one ``error: ...`` line (``-v``: the traceback). The run folder gets what ``@hydra.main`` wrote:
``config.yaml`` (resolved), ``.hydra/{config,overrides}.yaml`` and ``train.log``. ``hydra.run.dir=PATH`` still picks
the folder (default ``runs/${name}``, relative to the working directory). Everything below ``train(cfg)`` takes plain
arguments.

Several processes: ``torchrun --nproc_per_node=N -m train ...`` (NCCL on GPUs, gloo with ``device=cpu``). Every process
composes and checks the same config; rank 0 alone locks and writes the run folder (config, ``train.log``,
checkpoints, TensorBoard) and evaluates; the other ranks log warnings only (``-v``: everything, prefixed by rank).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from sidnet.cli import TRAIN_INTERRUPTED, config_help, pop_flag, pop_verbose, run_guarded
from sidnet.safety import UnsafeInputError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("sidnet.train")
EXAMPLES = [
    "python -m train epochs=10                                  # SIDNet-MobileNetV2 on data=auto",
    "python -m train model=sidnet data=coco128 epochs=50        # Darknet-19 SIDNet on the COCO JSON split",
    "python -m train data=path/to/mine.yaml                     # your own data YAML (roots relative to it)",
    "python -m train model=yolov2 optim=sgd optim.lr=0.01 name=yolo_ref",
    "python -m train name=sidnet_mobilenetv2 resume=true        # continue a run exactly where it stopped",
    "python -m train model.anchors=runs/anchors/mine.yaml       # anchors from python -m train.anchors --out",
]
USAGE = __doc__.split("\n\n")[0]
NOTES = """Flags: -v (traceback on error), -q/--quiet (no progress bars; they are off anyway when stderr is not a
terminal), --json (the run summary as JSON on stdout instead of the table). Output: runs/<name>/ with last.pt (what
resume needs), best.pt (EMA weights for evaluation/export), config.yaml, train.log, tb/. Schemas: sidnet/config.py."""


def help_text() -> str:
    """Config groups, their options and every key with its default (Hydra's --help, as ``yolo help``)."""
    import yaml
    from omegaconf import OmegaConf

    conf = PROJECT_ROOT / "conf"
    chosen: dict[str, str | None] = {}
    for item in yaml.safe_load((conf / "train.yaml").read_text())["defaults"]:
        if isinstance(item, dict):
            chosen.update(item)
    groups = {g: sorted(p.stem for p in (conf / g).glob("*.yaml")) for g in chosen}
    logging.getLogger("sidnet.data").setLevel(logging.ERROR)  # data=auto's "not found, using the sample" line
    _, cfg, _ = compose([])
    keys = OmegaConf.to_container(cfg, resolve=False)
    return config_help(usage=USAGE, groups=groups, chosen=chosen, keys=keys, examples=EXAMPLES, notes=NOTES)
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


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
    overrides = data_file_override(overrides)
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


def data_file_override(overrides: list[str]) -> list[str]:
    """``data=path/to/mine.yaml`` (a value ending in .yaml/.yml) → that file, read with its relative roots made
    absolute against its own folder (:func:`sidnet.data.sources.read_data_yaml`) and offered to Hydra as the data
    option ``file`` in the ConfigStore; other overrides such as ``data.negative_ratio=0`` still apply on top. A missing
    or malformed file is a one-line error before Hydra sees it."""
    from hydra.core.config_store import ConfigStore

    from sidnet.data.sources import is_data_file, read_data_yaml

    out = list(overrides)
    for i, item in enumerate(out):
        key, sep, value = item.partition("=")
        if sep and key == "data" and is_data_file(value):
            node = read_data_yaml(value, project_root=PROJECT_ROOT)
            ConfigStore.instance().store(group="data", name="file", node=node)
            log.info("data: %s", Path(value).resolve())
            out[i] = "data=file"
    return out


def _bad_config(e: Exception) -> ValueError:
    text = str(e) + (f"\n{e.__cause__}" if e.__cause__ is not None else "")
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    head = lines[0] if lines else type(e).__name__
    hint = next((ln for ln in lines[1:] if ln.startswith(("To append", "Value '", "Key '"))), "")
    hint = f"; {hint}" if hint else ""
    return ValueError(f"bad configuration: {head}{hint} (see conf/train.yaml and sidnet/config.py)")


def summary_table(summary: dict, run_dir: Path) -> None:
    """Per-epoch losses and validation metrics, then the checkpoints and their sizes."""
    from sidnet.progress import human_bytes, print_table

    rows = [(h["epoch"], h.get("loss"), h.get("val_AP50"), h.get("val_AP"), h.get("val_recall"), h.get("img_per_s"))
            for h in summary["history"]]  # fmt: skip
    print_table(f"training: {run_dir}", ["epoch", "loss", "val AP50", "val AP", "recall@0.3", "img/s"], rows)
    files = [(p.name, human_bytes(p.stat().st_size)) for p in (run_dir / "last.pt", run_dir / "best.pt") if p.is_file()]
    print(f"best AP50 {summary['best_ap50']:.4f}; " + ", ".join(f"{n} {s}" for n, s in files))


def run(overrides: list[str]) -> dict:
    from omegaconf import OmegaConf

    from sidnet.config import validate_train_config
    from sidnet.data import DataError
    from sidnet.safety import claim_run_dir

    try:
        config, cfg, run_dir = compose(overrides)
    except DataError:
        raise  # a data=<file>.yaml problem: already one line naming the file
    except UnsafeInputError:
        raise
    except Exception as e:  # noqa: BLE001  (Hydra/OmegaConf raise many types for one bad override)
        raise _bad_config(e) from e
    validate_train_config(config)  # names, ranges and the run folder first: answered before torch is imported
    claim_run_dir(run_dir, create=False)

    from sidnet.engine import distributed
    from sidnet.engine.runlock import acquire_run_lock
    from sidnet.engine.trainer import check_run_dir, check_train_config, train
    from sidnet.io import atomic_write_text

    check_train_config(config, project_root=PROJECT_ROOT)  # nothing is written before the config is known good
    ctx = distributed.setup(device=config.device, batch_size=config.batch_size, timeout_s=config.ddp.timeout_s)
    try:
        if ctx.is_main:
            claim_run_dir(run_dir)  # new, empty or a run of ours: never an unrelated folder's config.yaml
            acquire_run_lock(run_dir)
        check_run_dir(run_dir, resume=config.resume)  # a refused start must not overwrite the run's config.yaml
        if ctx.is_main:
            handler = logging.FileHandler(run_dir / "train.log")
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
            logging.getLogger().addHandler(handler)
            atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
            atomic_write_text(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))
            overrides_yaml = OmegaConf.to_yaml(OmegaConf.create(list(overrides)))
            atomic_write_text(run_dir / ".hydra" / "overrides.yaml", overrides_yaml)
        if ctx.enabled:
            log.info("%d processes (%s), %d images per process per step", ctx.world_size, ctx.backend,
                     config.batch_size // ctx.world_size)  # fmt: skip
        summary = train(config, run_dir=run_dir, project_root=PROJECT_ROOT, dist=ctx)
    finally:
        distributed.teardown(ctx)
    log.info("done: %d epochs, best AP50 %.4f, checkpoints in %s", summary["epochs"], summary["best_ap50"], run_dir)
    summary["run_dir"] = str(run_dir)
    return summary


def _launch_rank() -> int | None:
    """This process's rank under torchrun (for log prefixes), None for one process; a bad launch is reported later."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    except ValueError:
        return None


def main(argv: list[str] | None = None) -> dict:
    argv, verbose = pop_verbose(sys.argv[1:] if argv is None else list(argv))
    argv, quiet = pop_flag(argv, "-q", "--quiet")
    argv, as_json = pop_flag(argv, "--json")
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        raise SystemExit(0)
    flags = [a for a in argv if a.startswith("-")]
    if flags:
        raise SystemExit(f"error: unknown flag(s) {' '.join(flags)}: python -m train takes -v, -q, --json and "
                         "key=value overrides (python -m train --help lists them)")  # fmt: skip
    from sidnet.progress import set_quiet

    set_quiet(quiet)
    rank = _launch_rank()
    other_rank = rank not in (None, 0) and not verbose  # ranks > 0 repeat rank 0's log: warnings only
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING if other_rank else logging.INFO,
                        format=LOG_FORMAT if rank is None else f"[rank {rank}]{LOG_FORMAT}")  # fmt: skip
    summary = run_guarded(lambda: run(argv), verbose=verbose, interrupted=TRAIN_INTERRUPTED)
    if rank not in (None, 0):
        return summary  # rank 0 prints the table
    if as_json:
        import json

        print(json.dumps({k: v for k, v in summary.items() if k != "history"} | {"history": summary["history"]}))
    else:
        summary_table(summary, Path(summary["run_dir"]))
    return summary


if __name__ == "__main__":
    main()
