"""Does a PyNvVideoCodec decoder call hold Python's interpreter lock? One run, one GPU, side by side:

a pure-Python loop on the main thread (the pipeline's consumer stands in for it) counts its iterations and records its
longest stall while 0, 1, 4 threads decode the clip on NVDEC (``SimpleDecoder.get_batch_frames(8)``, the pipeline's
call; and ``ThreadedDecoder``, which decodes ahead in a native thread) and, as the control, while 4 threads decode it
with OpenCV (which releases the lock while it decodes). If the decoder keeps the lock, the loop's rate falls and its
stalls grow to a decoder call's length; if it releases it, the loop runs as it does alone (this machine has cores to
spare).

    python benchmarks/nvdec_gil.py --video clip_1080p_h264.mp4 [--seconds 3] [--out results.md]
"""

from __future__ import annotations

import argparse
import functools
import threading
import time
from pathlib import Path

from sidnet.environment import environment


def _nvdec_worker(path: str, stop: threading.Event, stats: dict, *, threaded: bool = False) -> None:
    import PyNvVideoCodec as nvc
    import torch

    stream = torch.cuda.Stream()
    dec = None
    while not stop.is_set():
        if dec is None and threaded:  # decodes ahead in PyNvVideoCodec's own (native) thread
            dec = nvc.ThreadedDecoder(path, 16, gpu_id=0, cuda_stream=stream.cuda_stream, use_device_memory=True,
                                      output_color_type=nvc.OutputColorType.RGB)  # fmt: skip
        elif dec is None:
            dec = nvc.SimpleDecoder(path, gpu_id=0, use_device_memory=True, cuda_stream=stream.cuda_stream,
                                    output_color_type=nvc.OutputColorType.RGB)  # fmt: skip
        t = time.perf_counter()
        with torch.cuda.stream(stream):
            got = dec.get_batch_frames(8)
        stats["call_s"] = max(stats.get("call_s", 0.0), time.perf_counter() - t)
        stats["frames"] = stats.get("frames", 0) + len(got)
        if not got:
            dec = None  # the clip ended: open it again


def _cv2_worker(path: str, stop: threading.Event, stats: dict) -> None:
    import cv2

    cap = cv2.VideoCapture(path)
    while not stop.is_set():
        t = time.perf_counter()
        ok, _ = cap.read()
        stats["call_s"] = max(stats.get("call_s", 0.0), time.perf_counter() - t)
        if not ok:
            cap = cv2.VideoCapture(path)
            continue
        stats["frames"] = stats.get("frames", 0) + 1


def _measure(worker, threads: int, path: str, seconds: float) -> dict:
    stop = threading.Event()
    stats = [{} for _ in range(threads)]
    ts = [threading.Thread(target=worker, args=(path, stop, s), daemon=True) for s in stats]
    for t in ts:
        t.start()
    time.sleep(1.0 if threads else 0.0)  # decoders opened and running
    for s in stats:
        s.clear()
    n, worst = 0, 0.0
    t0 = last = time.perf_counter()
    while (now := time.perf_counter()) - t0 < seconds:
        n += 1
        worst = max(worst, now - last)
        last = now
    elapsed = time.perf_counter() - t0
    stop.set()
    for t in ts:
        t.join(timeout=10)
    return {"loop_per_s": n / elapsed, "stall_ms": worst * 1e3, "frames_per_s": sum(s.get("frames", 0) for s in stats)
            / elapsed, "call_ms": max((s.get("call_s", 0.0) for s in stats), default=0.0) * 1e3}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--video", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    import torch

    env = environment(torch.device("cuda"))
    rows = [("alone", _measure(None, 0, str(args.video), args.seconds))]
    for k in (1, 4):
        rows.append((f"{k} NVDEC thread(s)", _measure(_nvdec_worker, k, str(args.video), args.seconds)))
    threaded = functools.partial(_nvdec_worker, threaded=True)
    for k in (1, 4):
        rows.append((f"{k} NVDEC ThreadedDecoder thread(s)", _measure(threaded, k, str(args.video), args.seconds)))
    rows.append(("4 OpenCV threads (control)", _measure(_cv2_worker, 4, str(args.video), args.seconds)))
    base = rows[0][1]["loop_per_s"]
    lines = [f"# Interpreter lock during NVDEC decoding — {env['device']}, {env['date']}, torch {env['torch']}", "",
             f"`{env['command']}` · clip `{args.video.name}`", "",
             "| decoding beside the loop | loop iterations/s | vs alone | longest loop stall ms | decoded frames/s | "
             "longest decoder call ms |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, r in rows:
        lines.append(f"| {name} | {r['loop_per_s']:,.0f} | {r['loop_per_s'] / base:.2f}x | {r['stall_ms']:.1f} | "
                     f"{r['frames_per_s']:,.0f} | {r['call_ms']:.1f} |")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
