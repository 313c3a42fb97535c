"""End-to-end rows for ``python -m deploy.benchmark --parts e2e``: the real pipeline (:func:`run_pipeline`: decode,
batch, GPU preprocess + inference, NMS, zones, JSON-lines and events, no video) on N copies of a clip, one row per
streams × resolution × decode path × backend, with the network-only img/s at the same batch beside each row, and
``--realtime`` rows (cameras at a fixed fps) for the number of cameras the machine keeps up with.

Clips: the shared 768×576 clip (MPEG-4 part 2 and its H.264 copy) and a 1920×1080 H.264 copy made at run time by
:func:`make_clip` (libx264 through PyAV, ``pip install av``; into the work folder, never committed).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sidnet.runtime.errors import DeployError


@dataclass(frozen=True)
class Case:
    streams: int
    clip: str  # a key of the clips mapping
    decode: str  # process | thread | nvdec | nvdec-ahead
    backend: str  # torch | onnxruntime
    realtime_fps: float | None = None


def make_clip(src: Path, dst: Path, *, width: int, height: int, crf: int = 23) -> Path:
    """``src`` resized to ``width``×``height`` (bilinear) and encoded as H.264 yuv420p (libx264, ``crf``) at the same
    frame rate; reused when ``dst`` exists."""
    if dst.is_file():
        return dst
    try:
        import av
    except ImportError as e:
        raise DeployError(
            f"making the {width}x{height} H.264 clip needs PyAV ({e}): pip install av (the video "
            "extra), or pass --clip-1080"
        ) from e
    import cv2

    cap = cv2.VideoCapture(str(src))
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf)}
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            rgb = cv2.cvtColor(cv2.resize(bgr, (width, height), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    cap.release()
    tmp.replace(dst)
    return dst


def _zones(names: list[str], width: int, height: int):
    """Two zones per stream (the left half, a triangle on the right), so every row pays for zones and alarms."""
    from sidnet.runtime.zones import Zone, ZoneConfig

    w, h = width - 1, height - 1
    cfg = ZoneConfig(debounce_frames=3, cooldown_s=5.0)
    for n in names:
        cfg.streams[n] = [Zone("left", np.float32([[0, h * 0.25], [w * 0.5, h * 0.25], [w * 0.5, h], [0, h]])),
                          Zone("right", np.float32([[w * 0.5, h * 0.2], [w, h * 0.5], [w * 0.5, h]]))]  # fmt: skip
    return cfg


def network_img_s(detector, batch: int) -> float:
    """The network alone at ``batch`` on the detector's backend: input already in place, no upload, no NMS."""
    be = detector.backend
    if hasattr(be, "run") and getattr(be, "graphs", False):
        import torch

        from sidnet.runtime.benchmark import iters_for, time_calls

        b = be.bucket(batch)
        be.slot(b)
        it, lat = iters_for(b)
        torch.cuda.synchronize()
        return time_calls(lambda: be.run(b), batch=b, iters=it, lat_iters=lat)["img_s"]
    s = detector.info.input_size
    x = np.random.default_rng(0).random((batch, 3, s, s), dtype=np.float32)
    be.infer(x)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        be.infer(x)
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def run_case(case: Case, detector, clip: Path, *, batch: int, max_frames: int | None, work_dir: Path,
             options: dict | None = None) -> dict:
    """One row; ``options``: more :class:`PipelineOptions` fields (``max_wait_ms``, ``decoders`` …)."""
    from sidnet.runtime.pipeline import PipelineOptions, run_pipeline
    from sidnet.runtime.sources import VideoFileSource

    names = [f"cam{i}" for i in range(case.streams)]
    sources = {n: VideoFileSource(n, clip) for n in names}
    w, h = sources[names[0]].size
    out = work_dir / f"e2e_{case.streams}x_{clip.stem}_{case.decode}_{case.backend}_{case.realtime_fps or 0}"
    shutil.rmtree(out, ignore_errors=True)
    opts = PipelineOptions(out_dir=out, batch_size=batch, write_video=False, max_frames=max_frames, progress=False,
                           decode=case.decode, writers=max(1, min(4, case.streams // 16)),
                           realtime=case.realtime_fps is not None, fps=case.realtime_fps,
                           **(options or {}))  # fmt: skip
    s = run_pipeline(detector, sources, zones=_zones(names, w, h), opts=opts)
    frames = sum(s["frames"].values())
    stages = dict(sorted(s["stages_s"].items(), key=lambda kv: -kv[1]))
    dropped = sum(d["pipeline_behind"] + d["decoder_behind"] for d in s["drops"].values())
    decode_paths = sorted(set(s["decode"].values()))
    return {"streams": case.streams, "clip": clip.name, "resolution": f"{w}x{h}", "decode": case.decode,
            "decode_used": decode_paths[0] if len(decode_paths) == 1 else decode_paths, "backend": case.backend,
            "precision": s["precision"], "batch": batch, "mean_batch": s["mean_batch"], "frames": frames,
            "seconds": s["seconds"], "frames_per_s": s["frames_per_s"], "latency_ms": s["latency_ms"],
            "detections_per_frame": round(sum(s["detections"].values()) / max(1, frames), 2),
            "alarms": sum(n for z in s["alarms"].values() for n in z.values()), "stages_s": stages,
            "decode_ms_per_frame": statistics.mean([v for v in s["decode_ms_per_frame"].values() if v] or [0]),
            "queue_depth": s["queue_depth"], "dropped": dropped, "kept_up": s["all_streams_kept_up"],
            "realtime_fps": case.realtime_fps, "rings_page_locked": s["rings_page_locked"],
            "max_wait_ms": s["max_wait_ms"]}  # fmt: skip


def pipeline_rows(*, cases: list[Case], detectors: dict, clips: dict[str, Path], batch: int, max_frames: int | None,
                  work_dir: Path, on_row=None, options: dict | None = None) -> tuple[list[dict], list[str]]:
    """Run every case (a failure costs its row, not the run); returns (rows, markdown table). A paced sweep (cases of
    one :func:`sweep_key`) stops at the first stream count that fell behind or failed: more cameras cannot keep up
    either, and the rows left are recorded as not run."""
    net = {name: network_img_s(det, batch) for name, det in detectors.items()}
    rows = []
    stopped: dict[tuple, int] = {}  # sweep → the stream count that fell behind (or failed)
    for case in cases:
        key = sweep_key(case)
        if key is not None and key in stopped:
            row = {"streams": case.streams, "clip": case.clip, "decode": case.decode, "backend": case.backend,
                   "realtime_fps": case.realtime_fps,
                   "not_run": f"{stopped[key]} streams already fell behind"}  # fmt: skip
        else:
            try:
                row = run_case(case, detectors[case.backend], clips[case.clip], batch=batch, max_frames=max_frames,
                               work_dir=work_dir, options=options)  # fmt: skip
            except Exception as e:  # noqa: BLE001  (recorded in the row)
                row = {"streams": case.streams, "clip": case.clip, "decode": case.decode, "backend": case.backend,
                       "realtime_fps": case.realtime_fps, "error": f"{type(e).__name__}: {e}"}  # fmt: skip
            if key is not None and ("error" in row or not row["kept_up"]):
                stopped[key] = case.streams
        row["network_img_s"] = round(net[case.backend], 1)
        row["clip_key"] = case.clip  # (a measured row's "clip" is the file name)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows, table(rows)


def sweep_key(case: Case) -> tuple | None:
    """The paced sweep a case belongs to (clip, decode, backend, fps), None for an unpaced case."""
    return None if case.realtime_fps is None else (case.clip, case.decode, case.backend, case.realtime_fps)


def realtime_cases(counts: list[int], specs: list[str], *, backend: str, fps: float) -> list[Case]:
    """Paced cases: every ``CLIP:DECODE[:BACKEND]`` of ``specs`` at every stream count, smallest count first (the
    order :func:`pipeline_rows` stops a sweep in)."""
    cases = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise DeployError(f"realtime case {spec!r}: write CLIP:DECODE[:BACKEND], e.g. 1080p-h264:nvdec")
        if any(n < 1 for n in counts):
            raise DeployError(f"realtime stream counts {counts} must be >= 1")
        b = parts[2] if len(parts) == 3 else backend
        cases += [Case(n, parts[0], parts[1], b, fps) for n in sorted(set(counts))]
    return cases


def cameras_kept_up(rows: list[dict]) -> list[str]:
    """One line per paced sweep: the largest stream count with every stream kept up (no drop), below the smallest
    count that fell behind, and what was tried."""
    sweeps: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("realtime_fps"):
            key = (r.get("clip_key", r["clip"]), r["decode"], r["backend"], r["realtime_fps"])
            sweeps.setdefault(key, []).append(r)
    lines = []
    for (clip, decode, backend, fps), rs in sweeps.items():
        rs = sorted(rs, key=lambda r: r["streams"])
        ran = [r for r in rs if "not_run" not in r]
        bad = [r["streams"] for r in ran if "error" in r or not r["kept_up"]]
        limit = min(bad) if bad else None
        good = [r["streams"] for r in ran if "error" not in r and r["kept_up"]]
        good = [n for n in good if limit is None or n < limit]
        where = f"{ran[0].get('resolution', clip) if ran else clip} {decode} {backend} at {fps:g} fps"
        best = f"**{max(good)}**" if good else "none of those tried"
        why = ""
        if limit is not None:
            failed = next(r for r in ran if r["streams"] == limit)
            why = f"; {limit} {'failed (' + failed['error'][:80] + ')' if 'error' in failed else 'fell behind'}"
        skipped = [r["streams"] for r in rs if "not_run" in r]
        lines.append(f"Largest N cameras kept up with ({where}, every stream without a drop): {best}{why} "
                     f"(tried {', '.join(str(r['streams']) for r in ran)}"
                     f"{'; not run: ' + ', '.join(map(str, skipped)) if skipped else ''}).")  # fmt: skip
    return lines


def table(rows: list[dict]) -> list[str]:
    lines = ["| streams | resolution | decode (used) | backend | frames/s | network img/s, same batch | e2e / network "
             "| p50 / p99 ms | mean batch | dets/frame | dropped | top stages (s, host) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        rt = f" (paced {r['realtime_fps']:g} fps" if r.get("realtime_fps") else ""
        if "error" in r or "not_run" in r:
            what = f"error: {r['error'][:120]}" if "error" in r else f"not run: {r['not_run']}"
            lines.append(f"| {r['streams']}{rt + ')' if rt else ''} | {r['clip']} | {r['decode']} | {r['backend']} | "
                         f"{what} | | | | | | | |")  # fmt: skip
            continue
        rt += (", kept up)" if r["kept_up"] else ", fell behind)") if rt else ""
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(r["stages_s"].items())[:3])
        used = r["decode_used"] if isinstance(r["decode_used"], str) else "; ".join(r["decode_used"])
        lines.append(f"| {r['streams']}{rt} | {r['resolution']} | {r['decode']} ({used}) | {r['backend']} "
                     f"{r['precision']} | {_num(r['frames_per_s'])} | {_num(r['network_img_s'])} | "
                     f"{r['frames_per_s'] / r['network_img_s']:.0%} | {r['latency_ms']['p50']} / "
                     f"{r['latency_ms']['p99']} | {r['mean_batch']} | {r['detections_per_frame']} | {r['dropped']} | "
                     f"{top} |")  # fmt: skip
    kept = cameras_kept_up(rows)
    return lines + ([""] + kept if kept else [])


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}"


def write(rows: list[dict], lines: list[str], out_dir: Path, *, stem: str, env: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    head = [f"# End-to-end pipeline ({env['device']})", "", f"{env['date']}, torch {env['torch']}, "
            f"command `{env['command']}`", ""]  # fmt: skip
    (out_dir / f"{stem}.md").write_text("\n".join(head + lines) + "\n")
