"""The multi-stream pipeline behind ``python -m deploy``: decode → batch → preprocess + inference → post-process →
zones and outputs, each stage where it runs best.

- **decode**: video files in worker processes writing into shared-memory frame rings (:mod:`sidnet.runtime.decode`),
  or on the GPU's NVDEC (:mod:`sidnet.runtime.nvdec`, ``decode="nvdec"``); live streams and image folders in a reader
  thread each (``decode="thread"`` puts every source there: the previous pipeline's path);
- **batch**: frames taken round-robin across streams (as DeepStream's stream muxer batches cameras), up to
  ``batch_size``; while the GPU is busy with earlier batches the batch keeps filling, when it is idle a partial batch
  goes at once (throughput under load, latency when lightly loaded); ``max_wait_ms`` bounds the filling: a partial
  batch whose oldest frame was captured that long ago goes as soon as a batch slot is free, busy GPU or not;
- **preprocess + inference**: on a GPU backend the uint8 frames go up from the rings (page-locked) on a copy stream
  and one CUDA graph per batch does letterbox + normalise + network + top-K (:meth:`GraphRunner.submit_frames`);
  ``inflight`` batches overlap (upload of one while another computes); on the CPU, OpenCV letterbox + the backend;
- **post-process**: threshold + NMS + un-letterbox for the whole batch at once (:func:`sidnet.runtime.nms.finalize`);
- **zones and outputs**: in ``writers`` processes (:mod:`sidnet.runtime.writer`), annotated video only for the
  streams in ``video_streams``.

``realtime`` paces file sources at their fps (cameras): frames that cannot be taken in time are dropped and counted
per stream, so the largest number of streams with no drops is the number of cameras the machine serves.
The summary (``summary.json``) has per-stage times, queue depths, drops per stream and capture→record latency.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sidnet.io import atomic_write_text
from sidnet.runtime.decode import Feed, Pacing, ProcessDecoders, ThreadFeed
from sidnet.runtime.detector import Detector
from sidnet.runtime.errors import DeployError
from sidnet.runtime.sources import ImageFolderSource, VideoFileSource
from sidnet.runtime.writer import WriterConfig, Writers
from sidnet.runtime.zones import ZoneConfig, check_zones_fit
from sidnet.safety import check_output_file, read_image

log = logging.getLogger("sidnet.runtime")
OUTPUT_FILES = ("summary.json", "events.jsonl")
DECODE_PATHS = ("process", "thread", "nvdec", "nvdec-ahead")


@dataclass
class PipelineOptions:
    out_dir: Path
    batch_size: int = 8
    write_video: bool = True
    video_streams: list[str] | None = None  # annotated output for these streams only (None: all, when write_video)
    max_frames: int | None = None  # per stream
    progress: bool = True
    queue_size: int = 8  # frames decoded ahead per stream (ring slots)
    decode: str = "process"  # process | thread | nvdec | nvdec-ahead (video files; live streams, folders: threads)
    decoders: int | None = None  # decode processes, or NVDEC threads (default: one per stream, at most cores - 2)
    writers: int = 1  # output processes (0: a thread in this process)
    realtime: bool = False  # pace file sources at their fps, drop what cannot be taken in time
    fps: float | None = None  # pacing rate instead of each file's own
    inflight: int = 2  # batches on the GPU at once
    first_frame_timeout: float = 20.0  # seconds a live stream may take to deliver its first frame
    max_wait_ms: float | None = None  # latency budget of a partial batch (capture → submit), None: fill while busy


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during the run: the outputs were finished (files closed, ``summary.json`` says ``interrupted``)."""

    def __init__(self, summary: dict) -> None:
        super().__init__()
        self.summary = summary


class _Events:
    """events.jsonl for this process's events (stream reconnects); writers append their alarms to the same file."""

    def __init__(self, path: Path) -> None:
        check_output_file(path).write_text("")
        self.f = open(path, "a")  # noqa: SIM115  (closed in close())
        self.counts: dict[str, int] = {}

    def __call__(self, event: dict) -> None:
        self.f.write(json.dumps({"wall_time": round(time.time(), 3), **event}) + "\n")
        self.f.flush()
        self.counts[event["type"]] = self.counts.get(event["type"], 0) + 1

    def close(self) -> None:
        self.f.close()


def check_out_dir(out_dir: Path, streams: list[str], *, force: bool) -> None:
    if not out_dir.exists():
        return
    files = [out_dir / n for n in OUTPUT_FILES] + [out_dir / f"{s}{x}" for s in streams for x in (".jsonl", ".mp4")]
    existing = [p for p in [*files, *(out_dir / s for s in streams)] if p.exists() or p.is_symlink()]
    if existing and not force:
        raise DeployError(f"{existing[0]} already exists: pass --force to overwrite, or choose another --out")
    for p in files:  # even with --force: never a FIFO, a device or a folder in place of an output file
        check_output_file(p)


def _first_size(src) -> tuple[int, int] | None:
    if isinstance(src, VideoFileSource):
        return src.size
    if isinstance(src, ImageFolderSource):
        img = read_image(src.files[0], what="image", fix="remove it or replace it with a readable image")
        return img.shape[1], img.shape[0]
    return None


def _check(opts: PipelineOptions, sources: dict) -> None:
    if opts.batch_size < 1:
        raise DeployError(f"--batch {opts.batch_size} must be >= 1")
    if opts.decode not in DECODE_PATHS:
        raise DeployError(f"--decode {opts.decode!r}: use one of {', '.join(DECODE_PATHS)}")
    unknown = set(opts.video_streams or []) - set(sources)
    if unknown:
        raise DeployError(f"--video-streams names {sorted(unknown)}, which are not sources of this run "
                          f"({', '.join(sources)})")  # fmt: skip
    for flag, value, least in (("--queue", opts.queue_size, 1), ("--decoders", opts.decoders or 1, 1),
                               ("--writers", opts.writers, 0)):  # fmt: skip
        if value < least:
            raise DeployError(f"{flag} {value} must be >= {least}")
    if opts.inflight not in (1, 2):
        raise DeployError(f"inflight {opts.inflight}: 1 or 2 batches (the GPU backends double-buffer)")
    if opts.fps is not None and opts.fps <= 0:
        raise DeployError(f"--fps {opts.fps} must be > 0")
    if opts.max_wait_ms is not None and not opts.max_wait_ms > 0:
        raise DeployError(f"--max-wait-ms {opts.max_wait_ms} must be > 0")


def submit_now(*, size: int, batch_size: int, busy: bool, draining: bool, oldest_age_ms: float,
               max_wait_ms: float | None) -> bool:  # fmt: skip
    """Whether a gathered batch of ``size`` frames goes to the detector now (a batch slot being free): when full, when
    the GPU is idle, when the streams have ended (``draining``), or when its oldest frame has waited ``max_wait_ms``
    since capture; otherwise it keeps filling while the GPU works."""
    if size <= 0:
        return False
    late = max_wait_ms is not None and oldest_age_ms >= max_wait_ms
    return size >= batch_size or not busy or draining or late


def open_feeds(sources: dict, detector: Detector, opts: PipelineOptions, pacing: Pacing | None, events) -> tuple:
    """(feeds by stream, decode path by stream, the owner of decode processes or None, NVDEC decoders or None)."""
    files = {n: s for n, s in sources.items() if isinstance(s, VideoFileSource)}
    paths = dict.fromkeys(sources, "thread")
    nvdec = procs = None
    if opts.decode in ("nvdec", "nvdec-ahead") and files:
        from sidnet.runtime.nvdec import nvdec_unavailable

        reason = nvdec_unavailable(detector)
        if reason:
            log.warning("--decode %s: %s; decoding the video files in CPU processes instead", opts.decode, reason)
            paths.update(dict.fromkeys(files, f"process (nvdec unavailable: {reason})"))
        else:
            from sidnet.runtime.nvdec import NvdecFeeds, open_decoder

            nvdec = NvdecFeeds(files, device=detector.backend.device, slots=_slots(opts, len(sources)),
                               max_frames=opts.max_frames, pacing=pacing,
                               threads=opts.decoders or max(1, min(len(files), _cores() - 2)),
                               opener=functools.partial(open_decoder, ahead=opts.decode == "nvdec-ahead"))  # fmt: skip
            paths.update(dict.fromkeys(nvdec.feeds, opts.decode))
            paths.update({n: f"process (nvdec failed: {why})" for n, why in nvdec.failed.items()})
            files = {n: s for n, s in files.items() if n in nvdec.failed}
    if opts.decode != "thread" and files:
        decoders = opts.decoders or max(1, min(len(files), _cores() - 2))
        procs = ProcessDecoders(files, decoders=decoders, slots=_slots(opts, len(sources)),
                                max_frames=opts.max_frames, pacing=pacing)  # fmt: skip
        register = getattr(detector.backend, "register_host", None)
        if register is not None and detector.gpu_preprocess:
            for ring in procs.rings.values():
                if register(ring.address, ring.spec.data_nbytes):
                    procs.registered.append((detector.backend, ring.address))
        for n in files:
            paths[n] = "process" if paths[n] == "thread" else paths[n]
    feeds: dict[str, Feed] = {}
    for name, src in sources.items():
        if procs is not None and name in procs.feeds:
            feeds[name] = procs.feeds[name]
        elif nvdec is not None and name in nvdec.feeds:
            feeds[name] = nvdec.feeds[name]
        else:
            if getattr(src, "live", False):
                src.on_event = events
            feeds[name] = ThreadFeed(name, src, max_frames=opts.max_frames, slots=_slots(opts, len(sources)),
                                     pacing=pacing)  # fmt: skip
    return feeds, paths, procs, nvdec


def _slots(opts: PipelineOptions, streams: int) -> int:
    # two batches in flight may hold this stream's share of each, plus room to decode ahead
    return max(opts.queue_size, opts.inflight * math.ceil(opts.batch_size / max(1, streams)) + 2)


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)


class _Stages:
    """Host seconds per stage of the inference loop, queue depth samples."""

    def __init__(self) -> None:
        self.s = dict.fromkeys(("gather", "preprocess", "inference", "postprocess", "handoff", "idle"), 0.0)
        self.depth: list[int] = []

    def add(self, key: str, t0: float) -> float:
        t = time.perf_counter()
        self.s[key] += t - t0
        return t


def run_pipeline(detector: Detector, sources: dict, *, zones: ZoneConfig | None, opts: PipelineOptions) -> dict:
    """Run every source to its end (or ``max_frames``); returns the summary also written to ``summary.json``."""
    _check(opts, sources)
    sizes = {}
    for name, src in sources.items():  # zones vs frame size: before any output for files and folders
        size = _first_size(src)
        if size is not None:
            sizes[name] = size
            if zones is not None:
                check_zones_fit(zones.streams.get(name, []), stream=name, width=size[0], height=size[1])
    warm_start = time.perf_counter()
    if hasattr(detector.backend, "warmup"):  # CUDA graphs + cuDNN autotuning for every batch bucket, up front
        detector.backend.warmup(opts.batch_size)
    if hasattr(detector.backend, "warmup_frames") and detector.gpu_preprocess:
        detector.backend.warmup_frames(opts.batch_size, sorted(set(sizes.values())))
    warmup_s = time.perf_counter() - warm_start
    made_dir = not opts.out_dir.exists()
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    fresh = [opts.out_dir / n for n in ("events.jsonl", *(f"{s}.jsonl" for s in sources))]
    fresh = [p for p in fresh if not p.exists()]  # what this run creates (removed again if no frame ever came)
    events = _Events(opts.out_dir / "events.jsonl")
    video = [] if not opts.write_video else (opts.video_streams or list(sources))
    cfg = WriterConfig(opts.out_dir, list(sources), detector.class_names, zones,
                       {s: ("folder" if isinstance(sources[s], ImageFolderSource) else "video",
                            getattr(sources[s], "fps", 25.0)) for s in video})  # fmt: skip
    pacing = Pacing(time.monotonic(), opts.fps) if opts.realtime else None  # each stream starts with its decoder
    bar = None
    if opts.progress:
        from sidnet.progress import progress

        counts = [getattr(s, "num_frames", None) for s in sources.values()]  # None: live, unknown
        counts = [min(n, opts.max_frames) if n and opts.max_frames else n for n in counts]
        bar = progress(desc="deploy", unit="frame", smoothing=0.1, total=None if None in counts else sum(counts))
    writers = feeds = procs = nvdec = None
    stats, st = None, _Stages()
    batches, sizes_run, start = 0, [], time.perf_counter()
    handed, interrupted = 0, False
    waiting = {n for n, s in sources.items() if getattr(s, "live", False)}  # live streams with no frame yet
    try:
        writers = Writers(cfg, n=opts.writers)
        feeds, paths, procs, nvdec = open_feeds(sources, detector, opts, pacing, events)
        start = time.perf_counter()
        active = list(feeds)
        turn = 0  # the stream that picks first rotates, so that no stream waits on the others' backlog
        inflight: deque = deque()
        batch: list = []
        t = time.perf_counter()
        while active or batch or inflight:
            # gather: round-robin, a fair share of the room left from each stream per pass
            turn = (turn + 1) % max(1, len(active))
            for name in active[turn:] + active[:turn]:
                room = opts.batch_size - len(batch)
                if room <= 0:
                    break
                got = feeds[name].poll(max(1, room // max(1, len(active))))
                batch += got
                if got:
                    waiting.discard(name)
                if not got and feeds[name].finished:
                    active.remove(name)
            t = st.add("gather", t)
            if waiting and time.perf_counter() - start > opts.first_frame_timeout:  # OpenCV's own waits may be longer
                late = sources[min(waiting)]
                raise late.never_delivered(f"gave no frame in {opts.first_frame_timeout:g} s")
            busy = bool(inflight) and not detector.ready(inflight[0][1])
            age_ms = (time.monotonic() - min(f.capture for f in batch)) * 1e3 if opts.max_wait_ms and batch else 0.0
            if len(inflight) < opts.inflight and submit_now(size=len(batch), batch_size=opts.batch_size, busy=busy,
                                                            draining=not active, oldest_age_ms=age_ms,
                                                            max_wait_ms=opts.max_wait_ms):  # fmt: skip
                st.depth.append(sum(f.depth() for f in feeds.values()))
                inflight.append((batch, detector.submit([f.image for f in batch], timings=st.s)))
                sizes_run.append(len(batch))
                batch = []
                batches += 1
                t = time.perf_counter()
            elif inflight and (not busy or len(inflight) >= opts.inflight or not active):
                frames, handle = inflight.popleft()
                dets = detector.collect(handle, timings=st.s)
                t = time.perf_counter()
                writers.send(frames, dets)
                handed += len(frames)
                for name in {f.stream for f in frames}:
                    feeds[name].release([f for f in frames if f.stream == name])
                if bar is not None:
                    bar.update(len(frames))
                t = st.add("handoff", t)
            else:
                time.sleep(0.0002)  # nothing decoded yet, or the GPU is busy and the batch can still grow
                t = st.add("idle", t)
        seconds = time.perf_counter() - start
        feed_stats = {n: (int(f.dropped), int(f.late), f.decode_ms()) for n, f in feeds.items()}
        gpu = procs is not None and detector.gpu_preprocess
        paths["rings_page_locked"] = f"{len(procs.registered)}/{len(procs.rings)}" if gpu else None
        stats = writers.close()
        writers = None
    except KeyboardInterrupt:  # Ctrl-C: finish the outputs of the frames handed over, then say so in the summary
        if not handed:
            raise
        interrupted, seconds = True, time.perf_counter() - start
        feed_stats = {n: (int(f.dropped), int(f.late), f.decode_ms()) for n, f in feeds.items()}
        stats = writers.close()
        writers = None
    finally:
        if writers is not None:
            try:
                writers.close()
            except BaseException:  # noqa: BLE001  (the error that got us here is the one to report)
                pass
        for f in (feeds or {}).values():
            if isinstance(f, ThreadFeed):
                f.close()
        for owner in (procs, nvdec):
            if owner is not None:
                owner.close()
        for name, src in sources.items():
            feed = (feeds or {}).get(name)
            if not (isinstance(feed, ThreadFeed) and feed.thread.is_alive()):  # never release under a blocked read
                src.close()
        events.close()
        if bar is not None:
            bar.close()
        if sys.exc_info()[0] is not None and not handed:  # failed before the first frame: leave nothing behind
            for p in fresh:
                p.unlink(missing_ok=True)
            if made_dir and not any(opts.out_dir.iterdir()):
                opts.out_dir.rmdir()
    summary = _summary(detector, opts, zones, stats, st, feed_stats, paths, events, batches=batches, sizes=sizes_run,
                       seconds=seconds, warmup_s=warmup_s, interrupted=interrupted)  # fmt: skip
    if interrupted:
        raise Interrupted(summary)
    return summary


def _summary(detector, opts, zones, stats, st, feeds: dict, paths, events, *, batches, sizes, seconds,
             warmup_s, interrupted: bool = False) -> dict:
    total = sum(stats["frames"].values())
    lat = stats["latency_ms"]
    drops = {n: {"pipeline_behind": d, "decoder_behind": late} for n, (d, late, _) in feeds.items()}
    decode_ms = {n: (round(v, 3) if v is not None else None) for n, (_, _, v) in feeds.items()}
    alarms = {s: stats["alarms"].get(s, {}) for s in (zones.streams if zones else [])}
    summary = {
        "artifact": str(detector.info.path), "backend": detector.backend_name, "model": detector.info.model,
        "precision": detector.info.precision, "conf_thresh": detector.conf_thresh, "nms_iou": detector.nms_iou,
        "batch_size": opts.batch_size, "max_wait_ms": opts.max_wait_ms, "frames": stats["frames"],
        "detections": stats["detections"],
        "alarms": alarms, "events": {**events.counts, **stats["events"]}, "batches": batches,
        "mean_batch": round(float(np.mean(sizes)), 2) if sizes else 0.0,
        "seconds": round(seconds, 3), "frames_per_s": round(total / seconds, 2) if seconds else None,
        "warmup_s": round(warmup_s, 3), "decode": {k: v for k, v in paths.items() if k != "rings_page_locked"},
        "rings_page_locked": paths.get("rings_page_locked"), "realtime": opts.realtime,
        "stages_s": {k: round(v, 3) for k, v in st.s.items()} | {"zones": round(stats["zones_s"], 3),
                                                                  "output": round(stats["output_s"], 3)},
        "decode_ms_per_frame": decode_ms,
        "queue_depth": {"mean": round(float(np.mean(st.depth)), 1) if st.depth else 0, "max": max(st.depth, default=0),
                        "slots_per_stream": _slots(opts, len(feeds))},
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
                       "p99": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
                       "max": round(float(lat.max()), 2) if len(lat) else None},
        "drops": drops, "all_streams_kept_up": all(d["pipeline_behind"] + d["decoder_behind"] == 0
                                                    for d in drops.values()),
    }  # fmt: skip
    summary["inference_s"] = round(st.s["inference"], 3)
    summary["interrupted"] = interrupted
    atomic_write_text(opts.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
