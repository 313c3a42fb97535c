"""Time your own artifacts (``python -m deploy.benchmark --checkpoint|--onnx|--engine FILE``), on the CPU or a GPU.

For each artifact, through the same :class:`~sidnet.runtime.detector.Detector` a deployment uses:

- ``network``: the backend alone on letterboxed frames (``backend.infer``, or ``infer_frames`` for the backends that
  letterbox on the GPU), per batch size;
- ``end_to_end``: ``Detector(frames)``: letterbox + network + threshold/NMS + un-letterbox, on decoded video frames.

Host wall time per call (the backends synchronise), repeated for at least ``seconds`` after warm-up; img/s, mean
ms per batch, p50/p99. The file's size on disk is reported beside it, and with two or more artifacts each row gets its
ratio to the first one's (e.g. INT8 vs FP32 on the same machine, in the same run).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sidnet.runtime.detector import Detector


def time_call(fn: Callable[[], object], *, batch: int, seconds: float, min_iters: int = 5) -> dict:
    for _ in range(2):
        fn()
    lat: list[float] = []
    t_end = time.perf_counter() + seconds
    while len(lat) < min_iters or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        lat.append((time.perf_counter() - t0) * 1e3)
    mean = statistics.mean(lat)
    return {"batch": batch, "img_s": batch / mean * 1e3, "ms_per_batch": mean, "iters": len(lat),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}  # fmt: skip


def bench_artifact(path: str | Path, frames: list[np.ndarray], *, batches: list[int], seconds: float = 3.0,
                   label: str | None = None, **options) -> list[dict]:  # fmt: skip
    """Rows (network and end_to_end, per batch) for one artifact; ``options`` go to the backend (``device`` …)."""
    from sidnet.progress import progress

    rows = []
    size = Path(path).stat().st_size if Path(path).is_file() else None
    with Detector(path, conf_thresh=0.3, **options) as det:
        short = "/".join(Path(path).parts[-2:])  # export/fp32/model.onnx vs export/int8/model.onnx: keep the folder
        label = label or f"{short} ({det.backend_name}, {det.info.precision})"
        base = {"artifact": str(path), "label": label, "backend": det.backend_name, "precision": det.info.precision,
                "input_size": det.info.input_size, "file_mb": round(size / 1e6, 1) if size else None}  # fmt: skip
        for bs in progress(batches, desc=f"benchmark {Path(path).name}", unit="batch size"):
            chunk = [frames[i % len(frames)] for i in range(bs)]
            if det.max_batch is not None and bs > det.max_batch:
                continue
            prepared = [det.prepare(f) for f in chunk]
            if det.gpu_preprocess:
                net = lambda p=prepared: det.backend.infer_frames([x.image for x in p])  # noqa: E731
            else:
                images = np.stack([p.image for p in prepared])
                net = lambda x=images: det.backend.infer(x)  # noqa: E731
            rows.append({**base, "mode": "network", **time_call(net, batch=bs, seconds=seconds)})
            rows.append({**base, "mode": "end_to_end", **time_call(lambda c=chunk: det(c), batch=bs,
                                                                   seconds=seconds)})  # fmt: skip
    return rows


def add_ratios(rows: list[dict]) -> list[dict]:
    """``vs_first``: img/s relative to the first artifact's row of the same mode and batch."""
    first = rows[0]["artifact"] if rows else None
    ref = {(r["mode"], r["batch"]): r["img_s"] for r in rows if r["artifact"] == first}
    for r in rows:
        base = ref.get((r["mode"], r["batch"]))
        r["vs_first"] = round(r["img_s"] / base, 3) if base else None
    return rows


def video_frames(video: Path | None, *, count: int = 32, size: tuple[int, int] = (768, 576)) -> tuple[list, str]:
    """Decoded RGB frames of ``video`` (the first ``count``), or seeded random frames when there is none."""
    if video is not None and Path(video).is_file():
        import cv2

        cap, frames = cv2.VideoCapture(str(video)), []
        while len(frames) < count:
            ok, bgr = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        cap.release()
        if frames:
            return frames, f"{len(frames)} frames of {video} ({frames[0].shape[1]}x{frames[0].shape[0]})"
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(count)]
    return frames, f"{count} random {size[0]}x{size[1]} frames"


def markdown(rows: list[dict], env: dict, *, frames: str, skipped: list[str]) -> str:
    lines = [f"# Artifact benchmark ({env['device']})", "",
             f"{env['date']}, torch {env['torch']}, onnxruntime {env.get('onnxruntime', '?')}, python {env['python']}, "
             f"command `{env['command']}`; {frames}.", ""]  # fmt: skip
    if skipped:
        lines += [f"Skipped: {'; '.join(skipped)}.", ""]
    lines += ["| artifact | mode | batch | img/s | ms/batch | p50 ms | p99 ms | vs first | file MB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"{r['vs_first']:.2f}x" if r.get("vs_first") is not None else "-"
        lines.append(f"| {r['label']} | {r['mode']} | {r['batch']} | {r['img_s']:,.1f} | {r['ms_per_batch']:.1f} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {vs} | {r['file_mb'] or '-'} |")  # fmt: skip
    return "\n".join(lines) + "\n"
