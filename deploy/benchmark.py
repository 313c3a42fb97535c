"""``python -m deploy.benchmark``: inference speed on a CUDA GPU (see :mod:`sidnet.runtime.benchmark`).

    python -m deploy.benchmark --parts eager torch compiled e2e --out benchmarks/results --stem deploy_h100
    python -m deploy.benchmark --parts torch compile --compile-batches 1 64     # vs torch.compile, same run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PARTS = ("eager", "torch", "compiled", "compile", "compile-ours", "e2e", "ort")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m deploy.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["eager", "torch", "e2e"], choices=PARTS)
    p.add_argument("--models", nargs="+", default=["sidnet", "yolov2"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16, 32, 64, 128])
    p.add_argument("--compiled-models", nargs="+", help="models for the compiled part (default: all --models)")
    p.add_argument("--compile-batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--video", type=Path, default=Path("../shared/data/video/pedestrians_200.mp4"))
    p.add_argument("--out", type=Path, default=Path("outputs/benchmark"))
    p.add_argument("--stem", default="deploy")
    p.add_argument("--work-dir", type=Path, default=Path("outputs/benchmark/work"))
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: python -m deploy.benchmark needs a CUDA GPU (run it through benchmarks/run_gpu.sh)")
    from sidnet.runtime.benchmark import run_benchmark

    video = args.video if args.video.is_file() else None
    if "e2e" in args.parts and video is None:
        raise SystemExit(f"error: --video {args.video} not found: the end-to-end part decodes it")
    run_benchmark(parts=set(args.parts), models=args.models, batches=args.batches,
                  compile_batches=args.compile_batches, video=video, out_dir=args.out, stem=args.stem,
                  work_dir=args.work_dir, compiled_models=args.compiled_models)  # fmt: skip
    print(f"results: {args.out}/{args.stem}.md", file=sys.stderr)


if __name__ == "__main__":
    main()
