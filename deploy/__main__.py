"""``python -m deploy ARTIFACT SOURCE [SOURCE ...]``: detect people in several streams at once, raise zone alarms.

    python -m deploy runs/sidnet/export/model.onnx cam0=../shared/data/video/pedestrians_200.mp4 \\
        cam1=rtsp://10.0.0.5/stream --zones zones.yaml --out outputs/deploy --batch 16

ARTIFACT: ``.engine`` (TensorRT, sidecar beside it), ``.onnx`` (onnxruntime), ``.pt`` checkpoint (torch) or ``.pt2``
(AOTInductor package, ``python -m export --backend compiled``); the backend follows from the file. SOURCE: an image
folder, a video file, an RTSP/HTTP URL or a webcam index, optionally named ``name=SOURCE`` (zones refer to names).
Outputs per stream in ``--out``: ``<name>.jsonl``, ``<name>.mp4`` (folders: ``<name>/`` images), plus
``events.jsonl`` and ``summary.json``. Bad input ends with one ``error: ...`` line (``-v`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from sidnet.cli import OneLineParser, non_negative_int, positive_float, positive_int, unit_interval

    p = OneLineParser(prog="python -m deploy", description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", help=".engine | .onnx | .pt | .pt2 | triton://HOST:PORT/MODEL (a Triton server, "
                   "python -m deploy.serve)")
    p.add_argument("sources", nargs="+", help="[name=]folder | video file | rtsp://… | http://… | webcam index")
    p.add_argument("--backend", help="tensorrt | onnxruntime | torch | compiled | triton (must match the artifact; "
                   "torch also runs an INT8 export's model.onnx on the GPU's INT8 tensor cores)")
    p.add_argument("--zones", type=Path, help="intrusion zones YAML (see sidnet/runtime/zones.py)")
    p.add_argument("--out", type=Path, default=Path("outputs/deploy"), help="output folder (default outputs/deploy)")
    p.add_argument("--conf", type=unit_interval, default=0.3, help="score threshold in (0, 1] (default 0.3, the "
                   "SIDNet report's)")  # fmt: skip
    p.add_argument("--nms-iou", type=unit_interval, default=0.45)
    p.add_argument("--batch", type=positive_int, default=8, help="frames per inference batch, across streams "
                   "(default 8)")  # fmt: skip
    p.add_argument("--max-frames", type=positive_int, help="stop each stream after this many frames (>= 1)")
    p.add_argument("--device", help="torch/onnxruntime device: cuda | cpu (default: cuda when available for torch)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8", "fp8"),
                   help="torch backend: fp16 | fp32 for a checkpoint (default fp16 on a GPU); int8 (default) | fp8 "
                        "for an INT8 export's model.onnx (fp8: e4m3 on the same calibration's ranges, sm_89+)")
    p.add_argument("--plugin-library", help="tensorrt: libsidnet_kernels.so the engine's plugins were built with")
    p.add_argument("--no-video", action="store_true", help="write JSON-lines and events only")
    p.add_argument("--video-streams", nargs="+", metavar="NAME",
                   help="annotated video only for these streams (default: every stream, unless --no-video)")
    p.add_argument("--decode", choices=("process", "thread", "nvdec", "nvdec-ahead"), default="process",
                   help="video files: decode in worker processes (default), in a thread per stream (the previous "
                        "pipeline's path), or on the GPU's NVDEC (PyNvVideoCodec; falls back to processes, logged); "
                        "nvdec-ahead: NVDEC through PyNvVideoCodec's ThreadedDecoder (decodes ahead in native threads)")
    p.add_argument("--decoders", type=int, help="decode processes, or NVDEC threads with --decode nvdec "
                   "(default: one per stream, at most cores - 2)")
    p.add_argument("--writers", type=int, default=1, help="output processes (0: a thread; default 1)")
    p.add_argument("--queue", type=int, default=8, help="frames decoded ahead per stream (default 8)")
    p.add_argument("--realtime", action="store_true",
                   help="pace video files at their fps like cameras; frames the pipeline cannot take are dropped "
                        "and counted per stream")
    p.add_argument("--max-wait-ms", type=positive_float,
                   help="latency budget of a partial batch: once its oldest frame is this old (since capture) it goes "
                   "to the GPU even while the GPU is busy (default: it fills until the GPU is free)")
    p.add_argument("--fps", type=float, help="with --realtime: pace every file at this rate instead of its own")
    p.add_argument("--reconnect-retries", type=non_negative_int, default=10,
                   help="live streams that delivered frames: failed reconnects in a row before the stream is given up "
                   "(default 10)")  # fmt: skip
    p.add_argument("--first-frame-timeout", type=positive_float, default=20.0,
                   help="live streams: seconds to wait for the first frame before the run fails (default 20); a "
                   "stream that never delivered a frame is not retried")  # fmt: skip
    p.add_argument("-q", "--quiet", "--no-progress", dest="no_progress", action="store_true",
                   help="no progress bar (off anyway when stderr is not a terminal)")
    p.add_argument("--json", action="store_true", help="print summary.json on stdout instead of the table")
    p.add_argument("--force", action="store_true", help="overwrite outputs of an earlier run in --out")
    return p.add_verbose()


def _backend_options(args, backend: str) -> dict:
    opts = {}
    if args.device and backend in ("torch", "onnxruntime"):
        opts["device"] = args.device
    if args.precision and backend == "torch":
        opts["precision"] = args.precision
    if args.plugin_library and backend == "tensorrt":
        opts["plugin_library"] = args.plugin_library
    return opts


def run(args) -> dict:
    from sidnet.runtime.artifact import backend_for
    from sidnet.runtime.detector import Detector
    from sidnet.runtime.errors import DeployError
    from sidnet.runtime.pipeline import PipelineOptions, check_out_dir, run_pipeline
    from sidnet.runtime.sources import open_source, parse_source
    from sidnet.runtime.zones import load_zones

    named = [parse_source(s, i) for i, s in enumerate(args.sources)]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise DeployError(f"two sources share a name ({', '.join(names)}): name them name=SOURCE")
    backend = backend_for(args.artifact, args.backend)
    if args.precision and backend != "torch":
        raise DeployError(f"--precision {args.precision} applies to the torch backend, not {backend} (the "
                          f"artifact fixes its own precision): drop --precision or pass --backend torch")  # fmt: skip
    zones = load_zones(args.zones, streams=names) if args.zones else None
    check_out_dir(args.out, names, force=args.force)
    sources = {}
    try:
        for name, target in named:
            sources[name] = open_source(name, target, max_retries=args.reconnect_retries, max_frames=args.max_frames,
                                        first_frame_timeout=args.first_frame_timeout)  # fmt: skip
        detector = Detector(args.artifact, backend=backend, conf_thresh=args.conf, nms_iou=args.nms_iou,
                            **_backend_options(args, backend))  # fmt: skip
    except BaseException:
        for src in sources.values():
            src.close()
        raise
    with detector:
        opts = PipelineOptions(out_dir=args.out, batch_size=args.batch, write_video=not args.no_video,
                               video_streams=args.video_streams, max_frames=args.max_frames,
                               progress=not args.no_progress, queue_size=args.queue, decode=args.decode,
                               decoders=args.decoders, writers=args.writers, realtime=args.realtime,
                               fps=args.fps, first_frame_timeout=args.first_frame_timeout,
                               max_wait_ms=args.max_wait_ms)  # fmt: skip
        return run_pipeline(detector, sources, zones=zones, opts=opts)


def _interrupted(e: KeyboardInterrupt, out: Path) -> str:
    summary = getattr(e, "summary", None)  # sidnet.runtime.pipeline.Interrupted: the outputs were finished
    if summary is None:
        return f"deploy interrupted before the first frame: nothing was written to {out}"
    frames = sum(summary["frames"].values())
    return (f"deploy interrupted after {frames} frames: the outputs in {out} are complete up to there (summary.json "
            "says interrupted: true)")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if not args.verbose:  # FFmpeg's own lines ("moov atom not found") would precede our one-line error
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    from sidnet.cli import run_guarded

    summary = run_guarded(lambda: run(args), verbose=args.verbose, interrupted=lambda e: _interrupted(e, args.out))
    if args.json:
        print(json.dumps(summary))
        return summary
    from sidnet.progress import print_table

    alarms = sum(n for zs in summary["alarms"].values() for n in zs.values())
    rows = [(name, n, summary["detections"].get(name, 0), sum(summary["alarms"].get(name, {}).values()),
             ", ".join(f"{z} {k}" for z, k in summary["alarms"].get(name, {}).items()) or "-")
            for name, n in summary["frames"].items()]  # fmt: skip
    columns = ["stream", "frames", "detections", "alarms", "alarms per zone"]
    print_table(f"deploy: {args.artifact} -> {args.out}", columns, rows)
    frames = sum(summary["frames"].values())
    lat, kept = summary["latency_ms"], summary["all_streams_kept_up"]
    print(f"{frames} frames, {alarms} alarms, {summary['frames_per_s']} frames/s, latency p50 {lat['p50']} / p99 "
          f"{lat['p99']} ms{'' if kept else ', frames dropped (summary.json: drops)'} -> {args.out}")
    return summary


if __name__ == "__main__":
    main()
