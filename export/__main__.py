"""``python -m export``: argparse flags and Hydra overrides, composed onto ``conf/export.yaml``.

    python -m export --precision fp16 --backend tensorrt-rtx --checkpoint runs/sidnet/best.pt batch.max=32

How arguments are read: argparse takes the flags below with their values; every other argument must be a Hydra
override ``key=value`` (composed with ``hydra.compose`` onto ``conf/export.yaml`` and checked against
:class:`sidnet.export.config.ExportConfig`, so a typo is an error). Flags are applied after the overrides: a flag wins
over the same key given as ``key=value``. ``--model NAME`` selects ``conf/model/NAME.yaml`` (``model=NAME``).
``--checkpoint`` may be left out only with ``--random-init --model NAME``, which exports untrained weights
(BatchNorm statistics calibrated on random images) for smoke tests. Bad input ends with one ``error: ...`` line.
Hydra is used here only; everything below :func:`sidnet.export.pipeline.run_export` takes plain values.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sidnet.cli import OneLineParser

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FLAGS = {"checkpoint": "checkpoint", "precision": "precision", "backend": "backend", "target": "target", "out": "out",
         "calib_images": "int8.images", "calib_data": "int8.data", "calib_method": "int8.method",
         "calib_batches": "int8.batches", "calib_batch_size": "int8.batch_size", "gate_data": "int8.gate_data",
         "gate_split": "int8.gate_split"}  # fmt: skip


EXAMPLES = """Output folder (default): <checkpoint dir>/export/<precision> for ONNX, export/<backend>_<precision>
otherwise, so fp32, fp16 and int8 exports of one run never collide. Examples:
  python -m export --checkpoint runs/sidnet_mobilenetv2/best.pt                         # export/fp32/model.onnx
  python -m export --checkpoint runs/sidnet_mobilenetv2/best.pt --precision int8 --calib-data conf/data/coco128.yaml
  python -m export --checkpoint runs/sidnet_mobilenetv2/best.pt --backend triton        # Triton model repository"""


def epilog() -> str:
    """Every key of conf/export.yaml's schema with its default (model.* only matters with --random-init)."""
    import textwrap
    from dataclasses import asdict

    from sidnet.cli import flatten
    from sidnet.export.config import ExportConfig

    keys = [f"{k}={v}" for k, v in flatten(asdict(ExportConfig())) if not k.startswith("model.kwargs")]
    models = sorted(p.stem for p in (PROJECT_ROOT / "conf" / "model").glob("*.yaml"))
    body = textwrap.fill("  ".join(keys), width=118, initial_indent="  ", subsequent_indent="  ",
                         break_on_hyphens=False)  # fmt: skip
    return (f"Config group: model={' | '.join(models)} (with --random-init; a checkpoint carries its own).\n"
            f"Keys (key=value overrides of conf/export.yaml; a flag wins over the same key), with defaults:\n{body}\n"
            f"{EXAMPLES}")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m export",
        description=__doc__.split("\n\n")[0],
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", help="checkpoint .pt written by python -m train")
    p.add_argument("--precision", help="fp32 | fp16 | int8 (int8 needs --calib-images or --calib-data, except for "
                   "a QAT checkpoint)")
    p.add_argument("--backend", help="onnx | tensorrt | tensorrt-rtx | compiled (AOTInductor package)")
    p.add_argument("--target", help="plugins | native (default: plugins for tensorrt, native otherwise)")
    p.add_argument("--out", help="output folder (default: <checkpoint dir>/export/<precision>, or "
                   "export/<backend>_<precision> for tensorrt, tensorrt-rtx, compiled, triton)")
    p.add_argument("--calib-images", help="int8: a folder of calibration images")
    p.add_argument("--calib-data", help="int8: a data YAML; calibrates on its int8.split (train), gates on val:0/2")
    p.add_argument("--calib-method", help="int8: entropy (default) | minmax | percentile (int8.percentile=99.99)")
    p.add_argument("--calib-batches", type=int, help="int8: at most this many batches (default 1000)")
    p.add_argument("--calib-batch-size", type=int, help="int8: images per batch (default 8)")
    p.add_argument("--gate-data", help="int8: labelled data YAML for the accuracy gate (default: --calib-data)")
    p.add_argument("--gate-split", help="int8: its held-out split, part K of N by image id (default val:0/2; "
                   "score your test figures on val:1/2)")
    p.add_argument("--force", action="store_true", help="overwrite INT8 artifacts already in the output folder")
    p.add_argument("--random-init", action="store_true", help="export untrained weights (smoke tests only)")
    p.add_argument("--model", help="with --random-init: a conf/model/*.yaml name, e.g. sidnet")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars (off anyway when stderr is no tty)")
    p.add_argument("--json", action="store_true", help="print the export report (JSON) on stdout instead of the table")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def compose_config(overrides: list[str]):
    """conf/export.yaml + overrides → a typed ExportConfig (raises Hydra/OmegaConf errors on bad overrides)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from sidnet.export.config import ExportConfig

    ConfigStore.instance().store(name="export_schema", node=ExportConfig)
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return OmegaConf.structured(compose(config_name="export", overrides=overrides))


def main(argv: list[str] | None = None) -> None:
    args, rest = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    bad = [a for a in rest if a.startswith("-") or "=" not in a]
    if bad:
        raise SystemExit(
            f"error: unrecognised argument(s) {' '.join(bad)}: use the flags of python -m export --help "
            "or key=value overrides of conf/export.yaml"
        )
    overrides = [a for a in rest if not (args.model and a.startswith("model="))]
    overrides += [f"model={args.model}"] if args.model else []
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    from omegaconf import OmegaConf

    from sidnet.safety import UnsafeInputError, refuse_env_interpolations

    try:
        cfg = compose_config(overrides)
        for flag, key in FLAGS.items():
            if getattr(args, flag) is not None:
                OmegaConf.update(cfg, key, getattr(args, flag), merge=False)
        if args.random_init:
            cfg.random_init = True
        if args.force:
            cfg.force = True
        refuse_env_interpolations(OmegaConf.to_container(cfg, resolve=False), where="the export config")
        config = OmegaConf.to_object(cfg)
    except UnsafeInputError as e:
        raise SystemExit(f"error: {e}") from None
    except Exception as e:  # noqa: BLE001  (Hydra and OmegaConf raise many types for a bad override)
        raise SystemExit(f"error: bad configuration: {str(e).strip().splitlines()[0]}") from None

    from sidnet.cli import run_guarded
    from sidnet.export.pipeline import default_out_dir, run_export
    from sidnet.progress import set_quiet

    set_quiet(args.quiet)
    out = default_out_dir(config, project_root=PROJECT_ROOT)
    stopped = (f"export interrupted: nothing was added to {out} (artifacts are written aside and moved in only once "
               "all of them pass); run the same command again")
    # Bad input is the user's to fix: one line, no traceback (-v shows it).
    result = run_guarded(lambda: run_export(config, project_root=PROJECT_ROOT), verbose=args.verbose,
                         interrupted=stopped)  # fmt: skip
    if args.json:
        print(json.dumps(result.report))
        return
    summary_table(result)
    print(f"exported to {result.out_dir}: {', '.join(sorted(result.report['files']))}, {result.report_path.name}")


def summary_table(result) -> None:
    """What was written (sizes), with precision, backend and the parity verdict."""
    from sidnet.progress import human_bytes, print_table

    r = result.report
    rows = [(name, human_bytes((result.out_dir / name).stat().st_size)) for name in sorted(r["files"])
            if (result.out_dir / name).is_file()]  # fmt: skip
    title = (f"export: {r['model']['name']} {r['precision']}, backend {r['backend']}, target {r['target']} -> "
             f"{result.out_dir}")  # fmt: skip
    print_table(title, ["file", "size"], rows)
    print(f"parity: {r['parity']['summary']}")
    if "int8" in r and r["int8"].get("gate"):
        print(f"int8 gate: {json.dumps(r['int8']['gate'].get('summary', r['int8']['gate']))[:300]}")


if __name__ == "__main__":
    main()
