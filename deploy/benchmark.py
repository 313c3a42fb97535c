"""``python -m deploy.benchmark``: inference speed (see :mod:`sidnet.runtime.benchmark`) and the end-to-end pipeline
(:mod:`sidnet.runtime.bench_pipeline`).

    python -m deploy.benchmark --parts eager torch compiled --out benchmarks/results --stem deploy_h100
    python -m deploy.benchmark --parts torch compile --compile-batches 1 64     # vs torch.compile, same run
    python -m deploy.benchmark --parts e2e --e2e-streams 1 4 16 32 --e2e-clips 576p 576p-h264 1080p-h264 \\
        --e2e-decode process nvdec --e2e-realtime 64 128 --stem pipeline_h200     # python -m deploy's real pipeline

``e2e`` also runs on a CPU (onnxruntime and the torch backend in FP32); every other part needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PARTS = ("eager", "torch", "compiled", "compile", "compile-ours", "e2e", "e2e-host", "ort")
SHARED_VIDEO = Path("../shared/data/video")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m deploy.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["eager", "torch", "e2e"], choices=PARTS)
    p.add_argument("--models", nargs="+", default=["sidnet", "yolov2"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16, 32, 64, 128])
    p.add_argument("--compiled-models", nargs="+", help="models for the compiled part (default: all --models)")
    p.add_argument("--compile-batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--video", type=Path, default=SHARED_VIDEO / "pedestrians_200.mp4")
    p.add_argument("--out", type=Path, default=Path("outputs/benchmark"))
    p.add_argument("--stem", default="deploy")
    p.add_argument("--work-dir", type=Path, default=Path("outputs/benchmark/work"))
    e = p.add_argument_group("e2e (the python -m deploy pipeline)")
    e.add_argument("--checkpoint", type=Path, help="a trained checkpoint (default: SIDNet with random weights)")
    e.add_argument("--e2e-streams", nargs="+", type=int, default=[1, 4, 16, 32])
    e.add_argument("--e2e-clips", nargs="+", default=["576p", "576p-h264", "1080p-h264"],
                   help="576p (the shared MPEG-4 clip), 576p-h264 (its H.264 copy), 1080p-h264 (made at run time)")
    e.add_argument("--e2e-decode", nargs="+", default=["process"], help="process | thread | nvdec")
    e.add_argument("--e2e-backends", nargs="+", help="torch | onnxruntime (default: torch on a GPU, both on a CPU)")
    e.add_argument("--e2e-cases", nargs="+", metavar="N:CLIP:DECODE[:BACKEND]",
                   help="exactly these rows instead of streams x clips x decode x backends, e.g. 32:1080p-h264:nvdec")
    e.add_argument("--e2e-batch", type=int, default=32)
    e.add_argument("--e2e-frames", type=int, help="frames per stream (default: the whole 200-frame clip)")
    e.add_argument("--e2e-realtime", nargs="*", type=int, default=[],
                   help="stream counts to run paced at --e2e-fps (the 576p clip, process decode, first backend)")
    e.add_argument("--e2e-fps", type=float, default=30.0)
    e.add_argument("--clip-1080", type=Path, help="an existing 1080p H.264 clip instead of making one (needs av)")
    args = p.parse_args(argv)
    import torch

    parts = set(args.parts)
    if not torch.cuda.is_available() and parts - {"e2e"}:
        raise SystemExit("error: python -m deploy.benchmark needs a CUDA GPU for parts other than e2e (run it through "
                         "benchmarks/run_gpu.sh)")  # fmt: skip
    if parts & {"e2e", "e2e-host"} and not args.video.is_file():
        raise SystemExit(f"error: --video {args.video} not found: the end-to-end parts decode it")
    if parts - {"e2e"}:
        from sidnet.runtime.benchmark import run_benchmark

        run_benchmark(parts=parts - {"e2e"}, models=args.models, batches=args.batches,
                      compile_batches=args.compile_batches, video=args.video, out_dir=args.out, stem=args.stem,
                      work_dir=args.work_dir, compiled_models=args.compiled_models)  # fmt: skip
        print(f"results: {args.out}/{args.stem}.md", file=sys.stderr)
    if "e2e" in parts:
        from sidnet.cli import run_guarded

        run_guarded(lambda: e2e(args), verbose=True)


def e2e(args) -> None:
    import torch

    from sidnet.environment import environment
    from sidnet.runtime import bench_pipeline as bp
    from sidnet.runtime.detector import Detector

    cuda = torch.cuda.is_available()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    clips = {"576p": args.video, "576p-h264": args.video.with_name(args.video.stem + "_h264.mp4")}
    wanted = {c.split(":")[1] for c in args.e2e_cases if c.count(":") >= 2} if args.e2e_cases else set(args.e2e_clips)
    if "1080p-h264" in wanted and "1080p-h264" not in clips:
        clips["1080p-h264"] = args.clip_1080 or bp.make_clip(args.video, args.work_dir / "pedestrians_1080p_h264.mp4",
                                                             width=1920, height=1080)  # fmt: skip
    missing = [c for c in wanted if c not in clips or not Path(clips[c]).is_file()]
    if missing:
        raise SystemExit(f"error: clip(s) {missing} not found (known: 576p, 576p-h264, 1080p-h264)")
    ckpt = args.checkpoint or _random_checkpoint(args.work_dir / "sidnet_random.pt")
    backends = args.e2e_backends or (["torch"] if cuda else ["onnxruntime", "torch"])
    detectors = {}
    for b in backends:
        if b == "torch":
            detectors[b] = Detector(ckpt, conf_thresh=0.3, device="cuda" if cuda else "cpu")
        elif b == "onnxruntime":
            detectors[b] = Detector(_onnx(ckpt, args.work_dir), conf_thresh=0.3)
        else:
            raise SystemExit(f"error: --e2e-backends {b}: use torch or onnxruntime")
    cases = [bp.Case(n, clip, d, b) for b in backends for clip in args.e2e_clips for d in args.e2e_decode
             for n in args.e2e_streams]  # fmt: skip
    if args.e2e_cases:
        cases = [_case(spec, backends[0]) for spec in args.e2e_cases]
    cases += [bp.Case(n, "576p", "process", backends[0], args.e2e_fps) for n in args.e2e_realtime]
    env = environment("cuda" if cuda else "cpu")
    rows = []

    def on_row(row):
        rows.append(row)
        print(bp.table([row])[-1], flush=True)
        bp.write(rows, bp.table(rows), args.out, stem=args.stem, env=env)  # a run cut short keeps what it measured

    bp.pipeline_rows(cases=cases, detectors=detectors, clips=clips, batch=args.e2e_batch, max_frames=args.e2e_frames,
                     work_dir=args.work_dir, on_row=on_row)  # fmt: skip
    for d in detectors.values():
        d.close()
    print(f"results: {args.out}/{args.stem}.md", file=sys.stderr)


def _case(spec: str, backend: str):
    from sidnet.runtime.bench_pipeline import Case

    parts = spec.split(":")
    if len(parts) not in (3, 4) or not parts[0].isdigit():
        raise SystemExit(f"error: --e2e-cases {spec!r}: write STREAMS:CLIP:DECODE[:BACKEND], e.g. 32:576p:process")
    return Case(int(parts[0]), parts[1], parts[2], parts[3] if len(parts) == 4 else backend)


def _random_checkpoint(path: Path) -> Path:
    from sidnet.runtime.benchmark import _save_checkpoint, build_random

    return path if path.is_file() else _save_checkpoint(build_random("sidnet"), "sidnet", path)


def _onnx(ckpt: Path, work_dir: Path) -> Path:
    from sidnet.export.config import ExportConfig
    from sidnet.export.pipeline import run_export

    out = work_dir / f"onnx_{ckpt.stem}"
    onnx = out / "model.onnx"
    if onnx.is_file():
        return onnx
    return run_export(ExportConfig(checkpoint=str(ckpt), out=str(out)), project_root=Path(".")).onnx_path


if __name__ == "__main__":
    main()
