"""``python -m deploy.benchmark``: inference speed of your own artifacts (CPU or GPU), or the GPU suite.

    python -m deploy.benchmark --onnx runs/sidnet_mobilenetv2/export/fp32/model.onnx \\
        --onnx runs/sidnet_mobilenetv2/export/int8/model.onnx --batches 1 8       # side by side, ratios to the first
    python -m deploy.benchmark --checkpoint runs/sidnet_mobilenetv2/best.pt        # torch backend (cuda when present)
    python -m deploy.benchmark --engine runs/x/export/tensorrt_fp16/model.engine    # TensorRT (a CUDA GPU)
    python -m deploy.benchmark --parts eager torch compiled e2e --out benchmarks/results --stem deploy_h100   # GPU suite

With ``--checkpoint/--onnx/--engine`` (repeatable) the artifacts are timed through the Detector a deployment uses
(:mod:`sidnet.runtime.artifact_benchmark`). Without them, the ``--parts`` suite times random-weight models
(:mod:`sidnet.runtime.benchmark`); on a machine without CUDA it runs the parts that work on a CPU (onnxruntime and the
torch backend, through the same artifact path) and names the ones it skipped. Results: a table on stdout and
``<out>/<stem>.json`` / ``.md`` with device, versions, date and command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PARTS = ("eager", "torch", "compiled", "compile", "compile-ours", "e2e", "ort")
CPU_PARTS = {"torch": "torch backend on the CPU", "ort": "onnxruntime CPU"}  # what runs without CUDA


def _parser() -> argparse.ArgumentParser:
    from sidnet.cli import OneLineParser

    p = OneLineParser(prog="python -m deploy.benchmark", description=__doc__.split("\n\n")[0],
                      epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--checkpoint", action="append", default=[], type=Path, help="a .pt to time (torch backend)")
    p.add_argument("--onnx", action="append", default=[], type=Path, help="a .onnx to time (onnxruntime)")
    p.add_argument("--engine", action="append", default=[], type=Path, help="a TensorRT .engine to time (CUDA)")
    p.add_argument("--device", help="torch/onnxruntime device for your artifacts: cpu | cuda (default: cuda for "
                   "torch when present, cpu for onnxruntime)")  # fmt: skip
    p.add_argument("--seconds", type=float, default=3.0, help="artifacts: time each case at least this long")
    p.add_argument("--parts", nargs="+", default=["eager", "torch", "e2e"], choices=PARTS)
    p.add_argument("--models", nargs="+", default=["sidnet", "yolov2"])
    p.add_argument("--batches", nargs="+", type=int, help="batch sizes (default: 1 8 on the CPU, 1 8 16 32 64 128 "
                   "on a GPU)")  # fmt: skip
    p.add_argument("--compiled-models", nargs="+", help="models for the compiled part (default: all --models)")
    p.add_argument("--compile-batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--video", type=Path, default=Path("../shared/data/video/pedestrians_200.mp4"))
    p.add_argument("--out", type=Path, default=Path("outputs/benchmark"))
    p.add_argument("--stem", default=None, help="result file name (default: artifacts, or deploy for the suite)")
    p.add_argument("--work-dir", type=Path, default=Path("outputs/benchmark/work"))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result rows as JSON on stdout instead of the table")
    return p.add_verbose()


def run_artifacts(artifacts: list[tuple[str, Path]], args, *, cuda: bool, skipped: list[str]) -> dict:
    """Time each artifact; write <out>/<stem>.json/.md; return the results."""
    import onnxruntime

    from sidnet.environment import environment
    from sidnet.io import atomic_write_text
    from sidnet.runtime.artifact_benchmark import add_ratios, bench_artifact, markdown, video_frames
    from sidnet.runtime.errors import DeployError

    for kind, path in artifacts:
        if not path.is_file():
            raise FileNotFoundError(f"--{kind} {path} not found: pass a file written by python -m train / export")
        if kind == "engine" and not cuda:
            raise DeployError(f"--engine {path}: a TensorRT engine runs on a CUDA GPU, and this machine has none; "
                              "time the ONNX it was built from with --onnx instead")  # fmt: skip
    batches = args.batches or ([1, 8] if not cuda else [1, 8, 16, 32, 64])
    frames, described = video_frames(args.video)
    rows = []
    for kind, path in artifacts:
        opts = {"device": args.device} if args.device and kind in ("checkpoint", "onnx") else {}
        rows += bench_artifact(path, frames, batches=batches, seconds=args.seconds, **opts)
    rows = add_ratios(rows)
    env = {**environment("cuda" if cuda and args.device != "cpu" else "cpu"), "onnxruntime": onnxruntime.__version__}
    result = {"env": env, "frames": described, "skipped": skipped, "rows": rows}
    stem = args.stem or "artifacts"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.out / f"{stem}.md", markdown(rows, env, frames=described, skipped=skipped))
    result["files"] = [str(args.out / f"{stem}.json"), str(args.out / f"{stem}.md")]
    return result


def cpu_suite(args, *, skipped: list[str]) -> dict:
    """No CUDA: the ``--parts`` that run on a CPU, on random-weight models exported the way a user would."""
    from sidnet.export.config import ExportConfig
    from sidnet.export.pipeline import run_export
    from sidnet.runtime.benchmark import _save_checkpoint, build_random

    wanted = [p for p in args.parts if p in CPU_PARTS] or list(CPU_PARTS)
    artifacts = []
    args.work_dir.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        ckpt = _save_checkpoint(build_random(name).eval(), name, args.work_dir / f"{name}.pt")
        if "torch" in wanted:
            artifacts.append(("checkpoint", ckpt))
        if "ort" in wanted:
            r = run_export(ExportConfig(checkpoint=str(ckpt), out=str(args.work_dir / f"onnx_{name}")),
                           project_root=Path("."))  # fmt: skip
            artifacts.append(("onnx", r.onnx_path))
    return run_artifacts(artifacts, args, cuda=False, skipped=skipped)


def _table(result: dict) -> None:
    from sidnet.progress import print_table

    rows = [(r["label"], r["mode"], r["batch"], r["img_s"], r["p50_ms"], r["p99_ms"],
             f"{r['vs_first']:.2f}x" if r.get("vs_first") else "-", r["file_mb"]) for r in result["rows"]]  # fmt: skip
    print_table(f"inference on {result['env']['device']} ({result['frames']})",
                ["artifact", "mode", "batch", "img/s", "p50 ms", "p99 ms", "vs first", "MB"], rows)  # fmt: skip
    if result["skipped"]:
        print(f"skipped: {'; '.join(result['skipped'])}")
    print(f"results: {', '.join(result['files'])}")


def main(argv: list[str] | None = None) -> dict | None:
    args = _parser().parse_args(argv)
    import torch

    from sidnet.cli import run_guarded
    from sidnet.progress import set_quiet

    set_quiet(args.quiet)
    cuda = torch.cuda.is_available()
    artifacts = ([("checkpoint", p) for p in args.checkpoint] + [("onnx", p) for p in args.onnx]
                 + [("engine", p) for p in args.engine])  # fmt: skip
    if artifacts:
        result = run_guarded(lambda: run_artifacts(artifacts, args, cuda=cuda, skipped=[]), verbose=args.verbose)
    elif not cuda:
        gpu_only = [p for p in args.parts if p not in CPU_PARTS]
        skipped = [f"{', '.join(gpu_only)} (need a CUDA GPU)"] if gpu_only else []
        if not [p for p in args.parts if p in CPU_PARTS]:
            skipped.append(f"ran the CPU parts instead: {', '.join(CPU_PARTS.values())}")
        print(f"no CUDA GPU here: timing {', '.join(CPU_PARTS.values())} on random weights"
              + (f"; skipped {', '.join(gpu_only)}" if gpu_only else ""), file=sys.stderr)  # fmt: skip
        result = run_guarded(lambda: cpu_suite(args, skipped=skipped), verbose=args.verbose)
    else:
        from sidnet.runtime.benchmark import run_benchmark

        video = args.video if args.video.is_file() else None
        if "e2e" in args.parts and video is None:
            raise SystemExit(f"error: --video {args.video} not found: the end-to-end part decodes it")
        stem = args.stem or "deploy"
        run_benchmark(parts=set(args.parts), models=args.models, batches=args.batches or [1, 8, 16, 32, 64, 128],
                      compile_batches=args.compile_batches, video=video, out_dir=args.out, stem=stem,
                      work_dir=args.work_dir, compiled_models=args.compiled_models)  # fmt: skip
        print(f"results: {args.out}/{stem}.md", file=sys.stderr)
        return None
    if args.json:
        print(json.dumps(result))
    else:
        _table(result)
    return result


if __name__ == "__main__":
    main()
