"""The multi-stream pipeline behind ``python -m deploy``: decode → preprocess → batched inference → zones → write.

Threads, so the stages overlap and decoding does not starve the accelerator:

- one **reader** per source decodes frames and runs the CPU part of preprocessing (:meth:`Detector.prepare`) into a
  bounded queue (back-pressure instead of unbounded memory);
- the **inference** loop (the calling thread) batches frames *across* streams, round-robin, up to ``batch_size``
  (the way DeepStream's stream muxer batches cameras), without waiting for a slow stream: it takes what is ready;
- one **writer** applies the zones, writes JSON-lines, annotated video and events, and drives the progress bar.

A live stream that drops reconnects inside its reader (:class:`~sidnet.runtime.sources.LiveSource`) while the other
streams go on. Outputs in ``out_dir``: ``<stream>.jsonl`` (one line per frame), ``<stream>.mp4`` (or ``<stream>/``
annotated images for folders), ``events.jsonl`` (alarms, reconnects), ``summary.json``.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from sidnet.io import atomic_write_text
from sidnet.runtime.detector import Detector
from sidnet.runtime.errors import DeployError
from sidnet.runtime.nms import Detections
from sidnet.runtime.sources import Frame, ImageFolderSource, VideoFileSource
from sidnet.runtime.zones import ZoneConfig, check_zones_fit, update_zones
from sidnet.safety import check_output_file, open_output, read_image

_END = object()
OUTPUT_FILES = ("summary.json", "events.jsonl")


@dataclass
class PipelineOptions:
    out_dir: Path
    batch_size: int = 8
    write_video: bool = True
    max_frames: int | None = None  # per stream
    progress: bool = True
    queue_size: int = 64
    first_frame_timeout: float = 20.0  # seconds a live stream may take to deliver its first frame


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during the run: the outputs were finished (files closed, ``summary.json`` says ``interrupted``)."""

    def __init__(self, summary: dict) -> None:
        super().__init__()
        self.summary = summary


class _Events:
    def __init__(self, path: Path) -> None:
        self.lock = threading.Lock()
        self.f = open_output(path)
        self.counts: dict[str, int] = {}

    def __call__(self, event: dict) -> None:
        event = {"wall_time": round(time.time(), 3), **event}
        with self.lock:
            self.f.write(json.dumps(event) + "\n")
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


def annotate(frame: Frame, dets: Detections, *, class_names: list[str], zones=(), counts=None) -> np.ndarray:
    """BGR image with boxes, scores and zone outlines (red while occupied)."""
    img = cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR)
    for z in zones:
        hot = bool(counts and counts.get(z.name))
        color = (0, 0, 255) if hot else (0, 200, 255)
        cv2.polylines(img, [z.polygon.astype(np.int32).reshape(-1, 1, 2)], True, color, 2)
        cv2.putText(img, f"{z.name}: {counts.get(z.name, 0) if counts else 0}", tuple(int(v) for v in z.polygon[0]),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.6, color, 2)  # fmt: skip
    for (x1, y1, x2, y2), s, c in zip(dets.boxes, dets.scores, dets.classes, strict=True):
        cv2.rectangle(img, (int(x1), int(y1)), (int(x2), int(y2)), (0, 255, 0), 2)
        cv2.putText(img, f"{class_names[c]} {s:.2f}", (int(x1), max(12, int(y1) - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 255, 0), 1)  # fmt: skip
    return img


class _Writer(threading.Thread):
    def __init__(self, detector: Detector, sources: dict, zones: ZoneConfig | None, opts: PipelineOptions,
                 events: _Events, bar) -> None:  # fmt: skip
        super().__init__(daemon=True, name="deploy-writer")
        self.detector, self.sources, self.zone_cfg, self.opts, self.events, self.bar = (
            detector, sources, zones, opts, events, bar)  # fmt: skip
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.jsonl = {s: open_output(opts.out_dir / f"{s}.jsonl") for s in sources}
        self.videos: dict[str, cv2.VideoWriter] = {}
        self.frames = dict.fromkeys(sources, 0)
        self.detections = dict.fromkeys(sources, 0)
        self.checked: set[str] = set()
        self.error: BaseException | None = None

    def _zones(self, stream: str):
        return self.zone_cfg.streams.get(stream, []) if self.zone_cfg else []

    def _write_image(self, frame: Frame, img: np.ndarray) -> None:
        src = self.sources[frame.stream]
        if isinstance(src, ImageFolderSource):
            folder = self.opts.out_dir / frame.stream
            folder.mkdir(exist_ok=True)
            cv2.imwrite(str(check_output_file(folder / (Path(frame.name).stem + ".jpg"))), img)
            return
        writer = self.videos.get(frame.stream)
        if writer is None:
            fps = getattr(src, "fps", 25.0) or 25.0
            path = check_output_file(self.opts.out_dir / f"{frame.stream}.mp4")
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (img.shape[1], img.shape[0]))
            self.videos[frame.stream] = writer
        writer.write(img)

    def handle(self, frame: Frame, dets: Detections) -> None:
        zones = self._zones(frame.stream)
        if frame.stream not in self.checked:
            h, w = frame.image.shape[:2]
            check_zones_fit(zones, stream=frame.stream, width=w, height=h)
            self.checked.add(frame.stream)
        counts, alarms = {}, []
        if zones:
            counts, alarms = update_zones(zones, dets, time=frame.time, frame=frame.index, stream=frame.stream,
                                          cfg=self.zone_cfg, class_names=self.detector.class_names)  # fmt: skip
        for a in alarms:
            self.events(a)
        names = self.detector.class_names
        record = {"frame": frame.index, "time": round(frame.time, 3), **({"file": frame.name} if frame.name else {}),
                  "width": frame.image.shape[1], "height": frame.image.shape[0],
                  "detections": [{"box": [round(float(v), 2) for v in b], "score": round(float(s), 4),
                                  "class": names[c]} for b, s, c in zip(dets.boxes, dets.scores, dets.classes,
                                                                        strict=True)],
                  **({"zones": counts} if zones else {})}  # fmt: skip
        self.jsonl[frame.stream].write(json.dumps(record) + "\n")
        if self.opts.write_video:
            self._write_image(frame, annotate(frame, dets, class_names=names, zones=zones, counts=counts))
        self.frames[frame.stream] += 1
        self.detections[frame.stream] += len(dets)
        if self.bar is not None:
            self.bar.update(1)

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is _END:
                break
            if self.error is not None:
                continue  # drain so the producer never blocks
            try:
                for frame, dets in item:
                    self.handle(frame, dets)
            except BaseException as e:  # noqa: BLE001  (handed to the main thread, which raises it)
                self.error = e

    def close(self) -> None:
        for f in self.jsonl.values():
            f.close()
        for v in self.videos.values():
            v.release()


def _reader(src, detector: Detector, q: queue.Queue, max_frames: int | None, errors: list, stop: threading.Event):
    try:
        n = 0
        while not stop.is_set() and (max_frames is None or n < max_frames):
            frame = src.read()
            if frame is None:
                break
            q.put((frame, detector.prepare(frame.image)))
            n += 1
    except BaseException as e:  # noqa: BLE001  (reported by the main thread)
        errors.append(e)
    finally:
        q.put(_END)


def run_pipeline(detector: Detector, sources: dict, *, zones: ZoneConfig | None, opts: PipelineOptions) -> dict:
    """Run every source to its end (or ``max_frames``); returns the summary also written to ``summary.json``."""
    if opts.batch_size < 1:
        raise DeployError(f"--batch {opts.batch_size} must be >= 1")
    for name, src in sources.items():  # zones vs frame size: before any output for files and folders
        size = _first_size(src)
        if size is not None and zones is not None:
            check_zones_fit(zones.streams.get(name, []), stream=name, width=size[0], height=size[1])
    warm_start = time.perf_counter()
    if hasattr(detector.backend, "warmup"):  # CUDA graphs + cuDNN autotuning for every batch bucket, up front
        detector.backend.warmup(opts.batch_size)
    warmup_s = time.perf_counter() - warm_start
    made_dir = not opts.out_dir.exists()
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    fresh = [opts.out_dir / n for n in ("events.jsonl", *(f"{s}.jsonl" for s in sources))]
    fresh = [p for p in fresh if not p.exists()]  # what this run creates (removed again if no frame ever came)
    events = _Events(opts.out_dir / "events.jsonl")
    for src in sources.values():
        if getattr(src, "live", False):
            src.on_event = events
    bar = None
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(unit="frame", desc="deploy", dynamic_ncols=True, smoothing=0.1)
    writer = _Writer(detector, sources, zones, opts, events, bar)
    writer.start()
    stop, errors = threading.Event(), []
    queues = {name: queue.Queue(maxsize=opts.queue_size) for name in sources}
    readers = {name: threading.Thread(target=_reader, name=f"deploy-read-{name}", daemon=True,
                                      args=(src, detector, queues[name], opts.max_frames, errors, stop))
               for name, src in sources.items()}  # fmt: skip
    for t in readers.values():
        t.start()
    active = list(sources)
    waiting = {name for name, src in sources.items() if getattr(src, "live", False)}  # no first frame yet
    batches, infer_s, start = 0, 0.0, time.perf_counter()
    interrupted = False
    try:
        while active and not errors and writer.error is None:
            if waiting and time.perf_counter() - start > opts.first_frame_timeout:  # OpenCV's own waits may be longer
                late = sources[min(waiting)]
                errors.append(late.never_delivered(f"gave no frame in {opts.first_frame_timeout:g} s"))
                break
            batch: list[tuple[Frame, object]] = []
            progressed = True
            while len(batch) < opts.batch_size and progressed and active:
                progressed = False
                for name in list(active):  # round-robin: one frame per ready stream per pass
                    try:
                        item = queues[name].get_nowait()
                    except queue.Empty:
                        continue
                    progressed = True
                    if item is _END:
                        active.remove(name)
                    else:
                        batch.append(item)
                        waiting.discard(name)
                    if len(batch) >= opts.batch_size:
                        break
            if not batch:
                if active:
                    time.sleep(0.002)  # nothing decoded yet: wait for the readers
                continue
            t0 = time.perf_counter()
            results = detector.detect_prepared([p for _, p in batch])
            infer_s += time.perf_counter() - t0
            batches += 1
            writer.q.put([(f, d) for (f, _), d in zip(batch, results, strict=True)])
    except KeyboardInterrupt:  # Ctrl-C: finish what was decoded so far, then say so in the summary
        interrupted = True
    finally:
        stop.set()
        for q in queues.values():  # unblock readers waiting on a full queue
            while not q.empty():
                q.get_nowait()
        writer.q.put(_END)
        writer.join()
        writer.close()
        for name, src in sources.items():
            readers[name].join(timeout=2.0)
            if not readers[name].is_alive():  # one still blocked inside OpenCV's read: releasing under it is unsafe
                src.close()
        events.close()
        if bar is not None:
            bar.close()
    if (errors or writer.error is not None or interrupted) and not any(writer.frames.values()):
        for p in fresh:  # failed before the first frame (a stream that never worked): leave nothing behind
            p.unlink(missing_ok=True)
        if made_dir and not any(opts.out_dir.iterdir()):
            opts.out_dir.rmdir()
        if interrupted:
            raise KeyboardInterrupt
    if errors:
        raise errors[0]
    if writer.error is not None:
        raise writer.error
    seconds = time.perf_counter() - start
    total = sum(writer.frames.values())
    zone_alarms = {s: {z.name: z.alarms for z in zs} for s, zs in (zones.streams.items() if zones else [])}
    summary = {
        "artifact": str(detector.info.path), "backend": detector.backend_name, "model": detector.info.model,
        "precision": detector.info.precision, "conf_thresh": detector.conf_thresh, "nms_iou": detector.nms_iou,
        "batch_size": opts.batch_size, "frames": writer.frames, "detections": writer.detections,
        "alarms": zone_alarms, "events": dict(events.counts), "batches": batches,
        "seconds": round(seconds, 3), "frames_per_s": round(total / seconds, 2) if seconds else None,
        "inference_s": round(infer_s, 3), "warmup_s": round(warmup_s, 3), "interrupted": interrupted,
    }  # fmt: skip
    atomic_write_text(opts.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if interrupted:
        raise Interrupted(summary)
    return summary
