"""The output stage of ``python -m deploy``: zones and alarms, JSON-lines, events and annotated video, off the
inference loop.

The pipeline hands over one message per batch (:func:`batch_message`: frame metadata, every detection of the batch in
one array, and pixels only for the streams that write annotated video). :class:`OutputWriter` applies the zones for
each stream's frames of the batch at once (:func:`~sidnet.runtime.zones.update_zones_batch`), appends the JSON-lines
and alarm events, writes video, and measures each frame's latency from capture to its record being written. It runs
in ``writers`` processes (streams dealt round-robin, so that JSON formatting and zone checks at thousands of frames/s
do not take the inference loop's interpreter) or, with ``writers=0``, in a thread of the pipeline's process.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from sidnet.runtime.errors import DeployError
from sidnet.runtime.nms import Detections
from sidnet.runtime.sources import Frame
from sidnet.runtime.zones import ZoneConfig, check_zones_fit, update_zones_batch
from sidnet.safety import check_output_file, open_output

MASK_COLORS = ((255, 64, 64), (64, 255, 64), (64, 64, 255), (255, 255, 64), (255, 64, 255), (64, 255, 255))


@dataclass
class WriterConfig:
    out_dir: Path
    streams: list[str]
    class_names: list[str]
    zones: ZoneConfig | None = None
    video: dict[str, tuple[str, float]] = field(default_factory=dict)  # stream → ("video" | "folder", fps)


def annotate(frame: Frame, dets: Detections, *, class_names: list[str], zones=(), counts=None) -> np.ndarray:
    """BGR image with boxes, scores and zone outlines (red while occupied)."""
    img = cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR)
    for z in zones:
        hot = bool(counts and counts.get(z.name))
        color = (0, 0, 255) if hot else (0, 200, 255)
        cv2.polylines(img, [z.polygon.astype(np.int32).reshape(-1, 1, 2)], True, color, 2)
        cv2.putText(img, f"{z.name}: {counts.get(z.name, 0) if counts else 0}", tuple(int(v) for v in z.polygon[0]),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.6, color, 2)  # fmt: skip
    if dets.masks is not None:  # instance masks: a translucent fill per person
        for k, m in enumerate(dets.masks):
            img[m] = (0.5 * img[m] + 0.5 * np.array(MASK_COLORS[k % len(MASK_COLORS)], np.float32)).astype(np.uint8)
    for (x1, y1, x2, y2), s, c in zip(dets.boxes, dets.scores, dets.classes, strict=True):
        cv2.rectangle(img, (int(x1), int(y1)), (int(x2), int(y2)), (0, 255, 0), 2)
        cv2.putText(img, f"{class_names[c]} {s:.2f}", (int(x1), max(12, int(y1) - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 255, 0), 1)  # fmt: skip
    return img


def batch_message(frames: list[Frame], dets: list[Detections], *, video: set[str]) -> dict:
    """What crosses to a writer for one batch: small, and pixels only where annotated output is wanted."""
    arrays = [d.as_array() for d in dets]
    return {
        "meta": [(f.stream, f.index, f.time, f.capture, f.name, f.image.shape[1], f.image.shape[0]) for f in frames],
        "counts": [len(a) for a in arrays],
        "dets": np.concatenate(arrays) if arrays else np.zeros((0, 6), np.float32),
        # Mask R-CNN: each frame's masks as COCO RLE (compact to send; the JSON-lines carry them as they are)
        "rles": [None if d.masks is None else _encode_masks(d.masks) for d in dets],
        "images": {i: _host(f.image) for i, f in enumerate(frames) if f.stream in video},
    }


def _encode_masks(masks: np.ndarray) -> list[dict]:
    # Imported here: only Mask R-CNN artifacts have masks, and a Triton client (python -m deploy triton://...) runs in
    # a venv without pycocotools or torch, which sidnet.data brings.
    from sidnet.data.masks import encode_masks

    return encode_masks(masks)


def decode_masks(rles: list[dict] | None, height: int, width: int) -> np.ndarray | None:
    """COCO RLEs of one frame → (P, H, W) bool, or None when the artifact predicts no masks."""
    if rles is None:
        return None
    if not rles:
        return np.zeros((0, height, width), bool)
    from pycocotools import mask as mask_utils

    enc = [{"size": r["size"], "counts": r["counts"].encode()} for r in rles]
    return mask_utils.decode(enc).transpose(2, 0, 1).astype(bool)


def _host(image) -> np.ndarray:
    return image.cpu().numpy() if hasattr(image, "cpu") else np.array(image)  # a copy: ring slots get reused


class OutputWriter:
    def __init__(self, cfg: WriterConfig) -> None:
        self.cfg = cfg
        self.jsonl = {s: open_output(cfg.out_dir / f"{s}.jsonl") for s in cfg.streams}
        self.events = open(cfg.out_dir / "events.jsonl", "a")  # noqa: SIM115  (shared: one write per flush)
        self.videos: dict[str, cv2.VideoWriter] = {}
        self.frames = dict.fromkeys(cfg.streams, 0)
        self.detections = dict.fromkeys(cfg.streams, 0)
        self.event_counts: dict[str, int] = {}
        self.checked: set[str] = set()
        self.latency_ms: list[float] = []
        self.zones_s = self.output_s = 0.0

    def _zones(self, stream: str):
        return self.cfg.zones.streams.get(stream, []) if self.cfg.zones else []

    def handle(self, msg: dict) -> None:
        t0 = time.perf_counter()
        names = self.cfg.class_names
        split = np.split(msg["dets"], np.cumsum(msg["counts"])[:-1]) if msg["counts"] else []
        rles = msg.get("rles") or [None] * len(split)
        dets = [Detections(a[:, :4], a[:, 4], a[:, 5].astype(np.int64), masks=decode_masks(r, m[6], m[5]))
                for a, r, m in zip(split, rles, msg["meta"], strict=True)]  # fmt: skip
        by_stream: dict[str, list[int]] = {}
        for i, m in enumerate(msg["meta"]):
            by_stream.setdefault(m[0], []).append(i)
        counts: list[dict] = [{} for _ in msg["meta"]]
        alarms = []
        for stream, idx in by_stream.items():
            zones = self._zones(stream)
            if stream not in self.checked:
                check_zones_fit(zones, stream=stream, width=msg["meta"][idx[0]][5], height=msg["meta"][idx[0]][6])
                self.checked.add(stream)
            if zones:
                c, a = update_zones_batch(zones, [dets[i] for i in idx], times=[msg["meta"][i][2] for i in idx],
                                          frames=[msg["meta"][i][1] for i in idx], stream=stream, cfg=self.cfg.zones,
                                          class_names=names)  # fmt: skip
                for i, ci in zip(idx, c, strict=True):
                    counts[i] = ci
                alarms += a
        t1 = time.perf_counter()
        for a in alarms:
            self.events.write(json.dumps({"wall_time": round(time.time(), 3), **a}) + "\n")
            self.event_counts[a["type"]] = self.event_counts.get(a["type"], 0) + 1
        if alarms:
            self.events.flush()
        for i, (stream, index, t, _, name, w, h) in enumerate(msg["meta"]):
            d, zones = dets[i], self._zones(stream)
            record = {"frame": index, "time": round(t, 3), **({"file": name} if name else {}), "width": w, "height": h,
                      "detections": [{"box": [round(float(v), 2) for v in b], "score": round(float(s), 4),
                                      "class": names[c], **({"mask": r} if r is not None else {})}
                                     for b, s, c, r in zip(d.boxes, d.scores, d.classes, rles[i] or [None] * len(d),
                                                           strict=True)],
                      **({"zones": counts[i]} if zones else {})}  # fmt: skip
            self.jsonl[stream].write(json.dumps(record) + "\n")
            if i in msg["images"]:
                frame = Frame(stream, index, t, msg["images"][i], name)
                self._write_image(frame, annotate(frame, d, class_names=names, zones=zones, counts=counts[i]))
            self.frames[stream] += 1
            self.detections[stream] += len(d)
        for f in self.jsonl.values():
            f.flush()
        now = time.monotonic()
        self.latency_ms += [(now - m[3]) * 1e3 for m in msg["meta"]]
        self.zones_s += t1 - t0
        self.output_s += time.perf_counter() - t1

    def _write_image(self, frame: Frame, img: np.ndarray) -> None:
        kind, fps = self.cfg.video[frame.stream]
        if kind == "folder":
            folder = self.cfg.out_dir / frame.stream
            folder.mkdir(exist_ok=True)
            cv2.imwrite(str(check_output_file(folder / (Path(frame.name).stem + ".jpg"))), img)
            return
        writer = self.videos.get(frame.stream)
        if writer is None:
            path = check_output_file(self.cfg.out_dir / f"{frame.stream}.mp4")
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps or 25.0,
                                     (img.shape[1], img.shape[0]))  # fmt: skip
            self.videos[frame.stream] = writer
        writer.write(img)

    def stats(self) -> dict:
        zones = self.cfg.zones.streams if self.cfg.zones else {}
        return {"frames": self.frames, "detections": self.detections, "events": self.event_counts,
                "alarms": {s: {z.name: z.alarms for z in zones.get(s, [])} for s in self.cfg.streams if s in zones},
                "zones_s": self.zones_s, "output_s": self.output_s,
                "latency_ms": np.asarray(self.latency_ms, np.float32)}  # fmt: skip

    def close(self) -> None:
        for f in self.jsonl.values():
            f.close()
        self.events.close()
        for v in self.videos.values():
            v.release()


def writer_loop(cfg: WriterConfig, inbox, outbox) -> None:
    """Process (or thread) entry point: handle messages until ``None``; then put ("stats", …) or ("error", e)."""
    writer, error = OutputWriter(cfg), None
    outbox.put(("ready", None))
    while True:
        msg = inbox.get()
        if msg is None:
            break
        if error is None:
            try:
                writer.handle(msg)
            except BaseException as e:  # noqa: BLE001  (raised by the pipeline)
                error = e
                outbox.put(("error", e))
    writer.close()
    if error is None:
        outbox.put(("stats", writer.stats()))


class Writers:
    """``n`` writer processes (0: one thread here), streams dealt round-robin; ``send`` routes a batch's frames."""

    def __init__(self, cfg: WriterConfig, *, n: int) -> None:
        self.n = max(1, min(n, len(cfg.streams))) if n else 1
        self.shard = {s: i % self.n for i, s in enumerate(cfg.streams)}
        ctx = mp.get_context("spawn")
        self.inboxes, self.workers = [], []
        self.outbox = ctx.Queue() if n else queue.Queue()
        for i in range(self.n):
            part = [s for s in cfg.streams if self.shard[s] == i]
            zones = None
            if cfg.zones is not None:
                zones = replace(cfg.zones, streams={s: z for s, z in cfg.zones.streams.items() if s in part})
            video = {s: v for s, v in cfg.video.items() if s in part}
            sub = WriterConfig(cfg.out_dir, part, cfg.class_names, zones, video)
            inbox = ctx.Queue(maxsize=64) if n else queue.Queue(maxsize=64)
            worker = (ctx.Process(target=writer_loop, args=(sub, inbox, self.outbox), daemon=True,
                                  name=f"sidnet-writer-{i}") if n else
                      threading.Thread(target=writer_loop, args=(sub, inbox, self.outbox), daemon=True,
                                       name="deploy-writer"))  # fmt: skip
            worker.start()
            self.inboxes.append(inbox)
            self.workers.append(worker)
        self.video = set(cfg.video)
        self._early: list[dict] = []
        for _ in range(self.n):  # started (imports done, files open): frames sent from now on are handled at once
            self._take(timeout=120)

    def _take(self, timeout: float | None):
        try:
            kind, value = self.outbox.get(timeout=timeout) if timeout else self.outbox.get_nowait()
        except queue.Empty:
            if timeout:
                raise DeployError(f"an output writer did not answer within {timeout:.0f} s") from None
            return None
        if kind == "error":
            raise value
        if kind == "stats":
            self._early.append(value)
        return kind

    def send(self, frames: list[Frame], dets: list[Detections]) -> None:
        parts: list[list[int]] = [[] for _ in range(self.n)]
        for i, f in enumerate(frames):
            parts[self.shard[f.stream]].append(i)
        for w, idx in enumerate(parts):
            if idx:
                self.inboxes[w].put(batch_message([frames[i] for i in idx], [dets[i] for i in idx], video=self.video))
        self._take(timeout=None)  # a writer's error ends the run at the next batch

    def close(self) -> dict:
        """Stop the writers; merged stats (raises a writer's error)."""
        for inbox in self.inboxes:
            inbox.put(None)
        try:
            while len(self._early) < self.n:
                self._take(timeout=300)
        finally:
            for w in self.workers:
                w.join(timeout=10)
        results = self._early
        merged: dict = {"frames": {}, "detections": {}, "events": {}, "alarms": {}, "zones_s": 0.0, "output_s": 0.0}
        for r in results:
            for k in ("frames", "detections", "alarms"):
                merged[k].update(r[k])
            for k, v in r["events"].items():
                merged["events"][k] = merged["events"].get(k, 0) + v
            merged["zones_s"] += r["zones_s"]
            merged["output_s"] += r["output_s"]
        merged["latency_ms"] = np.concatenate([r["latency_ms"] for r in results]) if results else np.zeros(0)
        return merged
