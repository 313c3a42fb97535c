"""``python -m deploy.benchmark``: inference speed (see :mod:`sidnet.runtime.benchmark`) and the end-to-end pipeline
(:mod:`sidnet.runtime.bench_pipeline`).

    python -m deploy.benchmark --parts eager torch compiled --out benchmarks/results --stem deploy_h100
    python -m deploy.benchmark --parts torch compile --compile-batches 1 64     # vs torch.compile, same run
    python -m deploy.benchmark --parts torch int8 compile --models sidnet --int8-onnx export/int8/model.onnx \
        --batches 64 1 --compile-batches 64       # INT8 and FP8 tensor cores beside FP16 and torch.compile
    python -m deploy.benchmark --parts e2e --e2e-streams 1 4 16 32 --e2e-clips 576p 576p-h264 1080p-h264 \\
        --e2e-decode process nvdec --e2e-realtime 32 64 96 128 --stem pipeline_h200  # python -m deploy's pipeline
    python -m deploy.benchmark --parts e2e --e2e-cases 32:1080p-h264:nvdec --e2e-realtime 32 48 64 \
        --e2e-realtime-case 1080p-h264:nvdec --e2e-fps 30     # how many 1080p NVDEC cameras at 30 fps
    python -m deploy.benchmark --parts maskrcnn --maskrcnn-checkpoint runs/maskrcnn/best.pt   # Mask R-CNN variants

Your own artifacts, on a CPU or a GPU, through the Detector a deployment uses (artifact_benchmark):

    python -m deploy.benchmark --onnx runs/sidnet_mobilenetv2/export/fp32/model.onnx \\
        --onnx runs/sidnet_mobilenetv2/export/int8/model.onnx --batches 1 8       # side by side, ratios to the first
    python -m deploy.benchmark --checkpoint runs/sidnet_mobilenetv2/best.pt        # torch backend (cuda when present)
    python -m deploy.benchmark --engine runs/x/export/tensorrt_fp16/model.engine    # TensorRT (a CUDA GPU)

Without a CUDA GPU the suite runs the parts that work on a CPU (``torch`` and ``ort`` through the artifact path on
random weights, ``e2e`` with onnxruntime and the torch backend in FP32) and names the parts it skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PARTS = ("eager", "torch", "compiled", "compile", "compile-ours", "int8", "e2e", "e2e-host", "ort", "maskrcnn")
SHARED_VAL = Path("../shared/data/coco128/images/val2017")
SHARED_VIDEO = Path("../shared/data/video")
DEFAULT_PARTS = ["eager", "torch", "e2e"]
STOPPED = "benchmark interrupted: the rows timed so far were not written; run the same command again"
CPU_PARTS = {"torch": "torch backend on the CPU", "ort": "onnxruntime CPU"}  # timed as artifacts without CUDA


def main(argv: list[str] | None = None) -> dict | None:
    from sidnet.cli import OneLineParser

    p = OneLineParser(prog="python -m deploy.benchmark", description=__doc__.split("\n\n")[0],
                      epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                      formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    a = p.add_argument_group("your artifacts (repeatable; times them instead of the suite unless --parts is given)")
    a.add_argument("--checkpoint", action="append", default=[], type=Path,
                   help="a .pt (torch backend); with --parts e2e: the checkpoint the pipeline runs")
    a.add_argument("--onnx", action="append", default=[], type=Path, help="a .onnx (onnxruntime)")
    a.add_argument("--engine", action="append", default=[], type=Path, help="a TensorRT .engine (needs CUDA)")
    a.add_argument("--int8-onnx", action="append", default=[], type=Path,
                   help="an INT8 export's model.onnx on the torch backend (INT8 tensor-core kernels; on a CPU their "
                   "integer reference); pass it to --onnx too for onnxruntime's row beside it")  # fmt: skip
    a.add_argument("--device", help="torch/onnxruntime device: cpu | cuda (default: cuda for torch when present)")
    a.add_argument("--seconds", type=float, default=3.0, help="time each case at least this long (default 3)")
    p.add_argument("--parts", nargs="+", choices=PARTS, help=f"the suite's parts (default {' '.join(DEFAULT_PARTS)})")
    p.add_argument("--models", nargs="+", default=["sidnet", "yolov2"])
    p.add_argument("--batches", nargs="+", type=int, help="batch sizes (default: 1 8 on a CPU, 1 8 16 32 64 128 on a "
                   "GPU)")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="artifacts: print the result as JSON on stdout, no table")
    p.add_argument("-v", "--verbose", action="store_true", help="show the traceback of an error")
    p.add_argument("--compiled-models", nargs="+", help="models for the compiled part (default: all --models)")
    p.add_argument("--compile-batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--video", type=Path, default=SHARED_VIDEO / "pedestrians_200.mp4")
    p.add_argument("--out", type=Path, default=Path("outputs/benchmark"))
    p.add_argument("--stem", help="result file name (default: artifacts for your artifacts, deploy for the suite)")
    p.add_argument("--work-dir", type=Path, default=Path("outputs/benchmark/work"))
    e = p.add_argument_group("e2e (the python -m deploy pipeline)")
    e.add_argument("--e2e-streams", nargs="+", type=int, default=[1, 4, 16, 32])
    e.add_argument("--e2e-clips", nargs="+", default=["576p", "576p-h264", "1080p-h264"],
                   help="576p (the shared MPEG-4 clip), 576p-h264 (its H.264 copy), 1080p-h264 (made at run time)")
    e.add_argument("--e2e-decode", nargs="+", default=["process"], help="process | thread | nvdec | nvdec-ahead")
    e.add_argument("--e2e-backends", nargs="+", help="torch | onnxruntime (default: torch on a GPU, both on a CPU)")
    e.add_argument("--e2e-cases", nargs="+", metavar="N:CLIP:DECODE[:BACKEND]",
                   help="exactly these rows instead of streams x clips x decode x backends, e.g. 32:1080p-h264:nvdec")
    e.add_argument("--e2e-batch", type=int, default=32)
    e.add_argument("--e2e-frames", type=int, help="frames per stream (default: the whole 200-frame clip)")
    e.add_argument("--e2e-realtime", nargs="*", type=int, default=[],
                   help="stream counts to run paced at --e2e-fps, a sweep per --e2e-realtime-case, smallest first; "
                   "a sweep stops at the first count that falls behind and names the largest N kept up with")
    e.add_argument("--e2e-realtime-case", nargs="+", default=["576p:process"], metavar="CLIP:DECODE[:BACKEND]",
                   help="what the paced sweeps run (default 576p:process), e.g. 1080p-h264:nvdec")
    e.add_argument("--e2e-fps", type=float, default=30.0)
    e.add_argument("--e2e-max-wait-ms", type=float,
                   help="the pipeline's batch latency budget (PipelineOptions.max_wait_ms; default: none)")
    e.add_argument("--e2e-decoders", type=int, help="decode processes / NVDEC threads (default: streams, <= cores - 2)")
    e.add_argument("--clip-1080", type=Path, help="an existing 1080p H.264 clip instead of making one (needs av)")
    m = p.add_argument_group("maskrcnn (torchvision eager vs the torch backend's static deploy module)")
    m.add_argument("--maskrcnn-checkpoint", type=Path, help="a trained Mask R-CNN .pt (default: random weights)")
    m.add_argument("--maskrcnn-images", type=Path, help="real images to time on (default: ../shared/data/coco128/"
                   "images/val2017, else the bundled sample)")  # fmt: skip
    m.add_argument("--maskrcnn-size", type=int, default=512, help="input size for random weights (default 512)")
    m.add_argument("--maskrcnn-count", type=int, default=64, help="images to load (default 64)")
    m.add_argument("--maskrcnn-iters", type=int, default=64, help="calls per timing round at batch 1 (default 64)")
    m.add_argument("--maskrcnn-topk", type=int, default=100, help="the deploy module's detection rows (default 100)")
    m.add_argument("--no-compile", action="store_true", help="maskrcnn: skip the torch.compile rows")
    args = p.parse_args(argv)
    import torch

    from sidnet.cli import run_guarded
    from sidnet.progress import set_quiet

    set_quiet(args.quiet)
    cuda = torch.cuda.is_available()
    artifacts = ([("checkpoint", x) for x in args.checkpoint] + [("onnx", x) for x in args.onnx]
                 + [("int8-onnx", x) for x in args.int8_onnx] + [("engine", x) for x in args.engine])  # fmt: skip
    if artifacts and args.parts is None:
        result = run_guarded(lambda: run_artifacts(artifacts, args, cuda=cuda, skipped=[]), verbose=args.verbose,
                             interrupted=STOPPED)  # fmt: skip
        return _report(result, args)
    parts = set(args.parts or DEFAULT_PARTS)
    if "maskrcnn" in parts:  # runs on a CPU too (its FP32 rows), so before the GPU-only dispatch below
        run_guarded(lambda: maskrcnn_part(args, cuda=cuda), verbose=args.verbose, interrupted=STOPPED)
        parts.discard("maskrcnn")
        if not parts:
            return None
    if "int8" in parts and not args.int8_onnx:
        raise SystemExit("error: --parts int8 times an INT8 export: pass --int8-onnx <export>/int8/model.onnx")
    if parts & {"e2e", "e2e-host"} and not args.video.is_file():
        raise SystemExit(f"error: --video {args.video} not found: the end-to-end parts decode it")
    if not cuda:
        gpu_only = sorted(parts - {"e2e"} - set(CPU_PARTS))
        cpu = [x for x in (args.parts or DEFAULT_PARTS) if x in CPU_PARTS]
        print(f"no CUDA GPU here: running {', '.join(cpu + (['e2e'] if 'e2e' in parts else [])) or 'nothing'} on the "
              f"CPU" + (f"; skipped {', '.join(gpu_only)} (they need a CUDA GPU)" if gpu_only else ""),
              file=sys.stderr)  # fmt: skip
        skipped = [f"{', '.join(gpu_only)} (need a CUDA GPU)"] if gpu_only else []
        if cpu:
            rows = run_guarded(lambda: cpu_suite(args, cpu, skipped=skipped), verbose=args.verbose, interrupted=STOPPED)
            _report(rows, args)
        if "e2e" in parts:
            run_guarded(lambda: e2e(args), verbose=args.verbose, interrupted=STOPPED)
        return None
    if parts - {"e2e"}:
        from sidnet.runtime.benchmark import run_benchmark

        args.stem = args.stem or "deploy"
        run_benchmark(parts=parts - {"e2e"}, models=args.models, batches=args.batches or [1, 8, 16, 32, 64, 128],
                      compile_batches=args.compile_batches, video=args.video, out_dir=args.out, stem=args.stem,
                      work_dir=args.work_dir, compiled_models=args.compiled_models,
                      int8_onnx=args.int8_onnx)  # fmt: skip
        print(f"results: {args.out}/{args.stem}.md", file=sys.stderr)
    if "e2e" in parts:
        run_guarded(lambda: e2e(args), verbose=True, interrupted=STOPPED)
    return None


def e2e(args) -> None:
    import torch

    from sidnet.environment import environment
    from sidnet.runtime import bench_pipeline as bp
    from sidnet.runtime.detector import Detector
    from sidnet.runtime.errors import DeployError

    cuda = torch.cuda.is_available()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    clips = {"576p": args.video, "576p-h264": args.video.with_name(args.video.stem + "_h264.mp4")}
    wanted = {c.split(":")[1] for c in args.e2e_cases if c.count(":") >= 2} if args.e2e_cases else set(args.e2e_clips)
    if args.e2e_realtime:
        wanted |= {c.split(":")[0] for c in args.e2e_realtime_case}
    if "1080p-h264" in wanted and "1080p-h264" not in clips:
        clips["1080p-h264"] = args.clip_1080 or bp.make_clip(args.video, args.work_dir / "pedestrians_1080p_h264.mp4",
                                                             width=1920, height=1080)  # fmt: skip
    missing = [c for c in wanted if c not in clips or not Path(clips[c]).is_file()]
    if missing:
        raise SystemExit(f"error: clip(s) {missing} not found (known: 576p, 576p-h264, 1080p-h264)")
    args.stem = args.stem or "deploy"
    ckpt = args.checkpoint[0] if args.checkpoint else _random_checkpoint(args.work_dir / "sidnet_random.pt")
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
    try:
        cases += bp.realtime_cases(args.e2e_realtime, args.e2e_realtime_case, backend=backends[0], fps=args.e2e_fps)
    except DeployError as e:
        raise SystemExit(f"error: --e2e-realtime-case: {e}") from None
    unknown = sorted({c.backend for c in cases} - set(detectors))
    if unknown:
        raise SystemExit(f"error: backend(s) {unknown} of the cases are not among --e2e-backends {backends}")
    env = environment("cuda" if cuda else "cpu")
    rows = []

    def on_row(row):
        rows.append(row)
        print(bp.table([row])[2], flush=True)  # the row (the table's head is two lines)
        bp.write(rows, bp.table(rows), args.out, stem=args.stem, env=env)  # a run cut short keeps what it measured

    bp.pipeline_rows(cases=cases, detectors=detectors, clips=clips, batch=args.e2e_batch, max_frames=args.e2e_frames,
                     work_dir=args.work_dir, on_row=on_row,
                     options={"max_wait_ms": args.e2e_max_wait_ms, "decoders": args.e2e_decoders})  # fmt: skip
    for d in detectors.values():
        d.close()
    print(f"results: {args.out}/{args.stem}.md", file=sys.stderr)


def maskrcnn_part(args, *, cuda: bool) -> dict:
    """Mask R-CNN rows (:mod:`sidnet.runtime.benchmark_maskrcnn`): <out>/<stem>_maskrcnn.json/.md."""
    from sidnet.data.sample import sample_root
    from sidnet.environment import environment
    from sidnet.io import atomic_write_text
    from sidnet.progress import print_table
    from sidnet.runtime import benchmark_maskrcnn as bm

    ckpt = args.maskrcnn_checkpoint
    if ckpt is not None and not ckpt.is_file():
        raise FileNotFoundError(f"--maskrcnn-checkpoint {ckpt} not found: pass a best.pt/last.pt of a model=maskrcnn "
                                "training run")  # fmt: skip
    if ckpt is None:
        ckpt = _random_maskrcnn(args.work_dir, args.maskrcnn_size, topk=args.maskrcnn_topk)
        source = "random weights (not trained)"
    else:
        source = f"trained checkpoint {ckpt}"
    from sidnet.checkpoint import load_checkpoint

    spec = load_checkpoint(ckpt)["model"]
    if spec["name"] != "maskrcnn":
        raise ValueError(f"--maskrcnn-checkpoint {ckpt} holds model {spec['name']!r}, not maskrcnn")
    folder = args.maskrcnn_images or (SHARED_VAL if SHARED_VAL.is_dir() else sample_root() / "images" / "val2017")
    images = bm.load_images(folder, spec["input_size"], args.maskrcnn_count)
    batches = tuple(args.batches or (1, 8))
    result = bm.maskrcnn_rows(ckpt, images, batches=batches, iters=args.maskrcnn_iters,
                              compile_trunk=not args.no_compile, topk=args.maskrcnn_topk,
                              on_row=lambda r: print(f"{r['variant']:70s} bs {r['batch']:3d}: {r['img_s']:8.1f} img/s "
                                                     f"({r['x_eager_fp32']:.2f}x)", flush=True))  # fmt: skip
    env = environment("cuda" if cuda else "cpu")
    env["command"] = "python -m deploy.benchmark " + " ".join(sys.argv[1:])
    result.update(env=env, weights=source, images=f"{len(images)} from {folder}", input_size=spec["input_size"])
    stem = (args.stem or "deploy") + "_maskrcnn"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.out / f"{stem}.md", bm.markdown(result, env, source=f"{source}; {result['images']}",
                                                           size=spec["input_size"]))  # fmt: skip
    print_table(f"Mask R-CNN on {env['device']}", ["variant", "batch", "img/s", "x eager FP32"],
                [(r["variant"], r["batch"], r["img_s"], f"{r['x_eager_fp32']:.2f}x") for r in result["rows"]])
    print(f"results: {args.out}/{stem}.md", file=sys.stderr)
    return result


def _random_maskrcnn(work_dir: Path, size: int, *, topk: int) -> Path:
    """Random weights, torchvision's eager model keeping at most ``topk`` detections (as the deploy module)."""
    import torch

    from sidnet.checkpoint import build_model_from_spec, save_checkpoint

    path = work_dir / f"maskrcnn_random_{size}_{topk}.pt"
    if not path.is_file():
        torch.manual_seed(0)
        spec = {"name": "maskrcnn", "anchors": None, "num_classes": 1, "input_size": size,
                "kwargs": {"pretrained": None, "detections_per_img": topk}}  # fmt: skip
        work_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint({"model": spec, "model_state": build_model_from_spec(spec).state_dict(), "ema": None,
                         "epoch": 0, "config": {"data": {"class_names": ["person"]}}}, path)  # fmt: skip
    return path


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
        opts = {"device": args.device} if args.device and kind in ("checkpoint", "onnx", "int8-onnx") else {}
        if kind == "int8-onnx":
            opts["backend"] = "torch"
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


def cpu_suite(args, wanted: list[str], *, skipped: list[str]) -> dict:
    """No CUDA: the suite's ``torch`` / ``ort`` parts on random-weight models, exported the way a user would."""
    from sidnet.runtime.benchmark import _save_checkpoint, build_random

    artifacts = []
    args.work_dir.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        ckpt = _save_checkpoint(build_random(name).eval(), name, args.work_dir / f"{name}.pt")
        if "torch" in wanted:
            artifacts.append(("checkpoint", ckpt))
        if "ort" in wanted:
            artifacts.append(("onnx", _onnx(ckpt, args.work_dir)))
    return run_artifacts(artifacts, args, cuda=False, skipped=skipped)


def _report(result: dict, args) -> dict:
    if args.json:
        print(json.dumps(result))
        return result
    from sidnet.progress import print_table

    rows = [(r["label"], r["mode"], r["batch"], r["img_s"], r["p50_ms"], r["p99_ms"],
             f"{r['vs_first']:.2f}x" if r.get("vs_first") else "-", r["file_mb"]) for r in result["rows"]]  # fmt: skip
    print_table(f"inference on {result['env']['device']} ({result['frames']})",
                ["artifact", "mode", "batch", "img/s", "p50 ms", "p99 ms", "vs first", "MB"], rows)  # fmt: skip
    if result["skipped"]:
        print(f"skipped: {'; '.join(result['skipped'])}")
    print(f"results: {', '.join(result['files'])}")
    return result


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
