"""Where frames come from: decode worker processes over shared-memory rings, or threads (live streams, image folders,
and the previous pipeline's path), behind one consumer interface, :class:`Feed`.

Decoding in threads was the multi-stream pipeline's ceiling (~1,100 frames/s from 32 streams on a 16-core H200
host, issue 17): OpenCV releases the GIL while it decodes, but colour conversion, queues and the per-frame Python
work of every other stage share one interpreter. Video files are therefore decoded by ``decoders`` worker processes
(streams dealt round-robin), each writing RGB frames straight into its streams' :class:`~sidnet.runtime.rings.FrameRing`
(no pickling, no pipe); the pipeline uploads from the ring to the GPU and releases the slot. Live streams and image
folders keep a reader thread each (a live stream's frame size is only known once it connects).

``realtime``: a file source is paced at its fps (or ``fps``), as a camera would deliver it: frame *k* is due at
``t0 + k / fps``. A due frame that finds its ring full is dropped (the pipeline is behind: ``dropped``); a frame the
decoder reaches more than one period late is skipped (the decoder is behind: ``late``). Without ``realtime`` nothing
is dropped: a full ring makes the decoder wait.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sidnet.runtime.errors import DeployError
from sidnet.runtime.rings import (
    DECODE_NS,
    DROPPED,
    ENDED,
    FAILED,
    LATE,
    READ,
    RUNNING,
    STATE,
    STOP,
    FrameRing,
    RingSpec,
)
from sidnet.runtime.sources import Frame, VideoFileSource

_END = object()


@dataclass
class Pacing:
    """``t0``: the monotonic time before which no paced stream starts; ``fps``: override of the file's frame rate.

    Each stream's clock starts when its decoder first asks for a frame (``t0`` or later), as a camera's does when it is
    connected: a decoder process that takes longer than others to start is not counted as a stream falling behind.
    Frame ``k`` of a stream is due ``k / fps`` after that start. A stream is decoded by one thread or process only, so
    each process's copy of the start times holds its own streams'."""

    t0: float
    fps: float | None = None
    starts: dict[str, float] = field(default_factory=dict)

    def due(self, k: int, src_fps: float, *, stream: str) -> float:
        start = self.starts.get(stream)
        if start is None:
            start = self.starts[stream] = max(self.t0, time.monotonic())
        return start + k / (self.fps or src_fps or 25.0)


# ------------------------------------------------------------------------------------------------ decode processes
@dataclass(frozen=True)
class DecodeJob:
    name: str
    path: str
    ring: RingSpec
    max_frames: int | None
    threads: int


def decode_worker(jobs: list[DecodeJob], pacing: Pacing | None, errors) -> None:
    """Process entry point: decode every job's file into its ring, round-robin, until all have ended."""
    import cv2

    cv2.setNumThreads(1)  # colour conversion on this process's core; FFmpeg has its own threads
    states = []
    for job in jobs:
        ring = FrameRing.attach(job.ring)
        try:
            src = VideoFileSource(job.name, Path(job.path), threads=job.threads)
        except BaseException as e:  # noqa: BLE001  (the consumer raises it)
            errors.put((job.name, e))
            ring.header[STATE] = FAILED
            continue
        states.append([job, ring, src, 0])  # job, ring, source, frames read
    while states:
        wait = 0.002
        for st in list(states):
            job, ring, src, k = st
            try:
                w = _step(ring, src, k, job.max_frames, pacing)
            except BaseException as e:  # noqa: BLE001
                errors.put((job.name, e))
                w = None
                ring.header[STATE] = FAILED
            if w is None:  # ended
                if ring.header[STATE] == RUNNING:
                    ring.header[STATE] = ENDED
                src.close()
                states.remove(st)
            elif w == 0.0:
                st[3] += 1
                wait = 0.0
            else:
                wait = min(wait, w)
        if wait > 0:
            time.sleep(wait)


def _step(ring: FrameRing, src: VideoFileSource, k: int, max_frames: int | None, pacing: Pacing | None):
    """Try to produce frame ``k``: 0.0 when it was handled (written, dropped or skipped), seconds to wait before
    trying again, or None when the stream has ended."""
    if ring.header[STOP] or (max_frames is not None and k >= max_frames):
        return None
    if pacing is not None:
        due = pacing.due(k, src.fps, stream=src.name)
        now = time.monotonic()
        if now < due:
            return due - now
        if now >= pacing.due(k + 1, src.fps, stream=src.name):  # more than a period late: a camera would have moved on
            ring.header[LATE] += 1
            return 0.0 if src.skip() else None
        if ring.free_slots() == 0:  # the pipeline is behind: the frame is lost
            ring.header[DROPPED] += 1
            return 0.0 if src.skip() else None
    elif ring.free_slots() == 0:
        return 0.0005
    t = time.perf_counter_ns()
    frame = src.read(out=ring.slot_for_write())
    if frame is None:
        return None
    ring.header[DECODE_NS] += time.perf_counter_ns() - t
    ring.publish(index=frame.index, time=frame.time, capture=due if pacing is not None else frame.capture)
    return 0.0


class ProcessDecoders:
    """The decode processes of one run and the rings they fill (owned here, in the consumer process)."""

    def __init__(self, files: dict[str, VideoFileSource], *, decoders: int, slots: int, max_frames: int | None,
                 pacing: Pacing | None) -> None:  # fmt: skip
        ctx = mp.get_context("spawn")  # never fork a process that holds CUDA and thread pools
        self.errors = ctx.Queue()
        self.rings: dict[str, FrameRing] = {}
        self.registered: list[tuple] = []  # (backend, address): rings page-locked for uploads, undone at close
        for name, src in files.items():
            w, h = src.size
            self.rings[name] = FrameRing.create(slots=slots, height=h, width=w, name=name)
            src.close()  # opened to check the file and learn its size; the worker reopens it
        n = max(1, min(decoders, len(files)))
        threads = max(1, (os.cpu_count() or 2) // n)
        groups: list[list[DecodeJob]] = [[] for _ in range(n)]
        for i, (name, src) in enumerate(files.items()):
            groups[i % n].append(DecodeJob(name, str(src.path), self.rings[name].spec, max_frames, threads))
        self.procs = [ctx.Process(target=decode_worker, args=(g, pacing, self.errors), daemon=True,
                                  name=f"sidnet-decode-{i}") for i, g in enumerate(groups)]  # fmt: skip
        for p in self.procs:
            p.start()
        self.feeds = {name: RingFeed(name, ring, self) for name, ring in self.rings.items()}

    def check(self) -> None:
        """Raise a worker's error (or its death) in the consumer."""
        try:
            name, err = self.errors.get_nowait()
        except queue.Empty:
            pass
        else:
            raise err if isinstance(err, DeployError) else DeployError(f"stream {name}: decoding failed: {err!r}")
        for p in self.procs:
            if p.exitcode not in (None, 0):
                raise DeployError(f"decode worker {p.name} died (exit code {p.exitcode}); rerun with --decode thread "
                                  "to decode in this process")  # fmt: skip

    def close(self) -> None:
        for ring in self.rings.values():
            ring.header[STOP] = 1
        for backend, address in self.registered:
            backend.unregister_host(address)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        for ring in self.rings.values():
            ring.close()


# ------------------------------------------------------------------------------------------------------- feeds
class Feed:
    """Consumer side of one stream: ``poll(limit)`` returns ready frames without waiting, ``release(frames)`` hands
    their pixels back (after upload), ``finished`` once the stream ended and everything was taken."""

    decode = "?"
    dropped = late = 0

    def poll(self, limit: int) -> list[Frame]:
        raise NotImplementedError

    def release(self, frames: list[Frame]) -> None:
        pass

    def depth(self) -> int:
        return 0

    @property
    def finished(self) -> bool:
        raise NotImplementedError

    def decode_ms(self) -> float | None:
        return None


class RingFeed(Feed):
    decode = "process"

    def __init__(self, name: str, ring: FrameRing, owner: ProcessDecoders) -> None:
        self.name, self.ring, self.owner, self.taken = name, ring, owner, 0

    def poll(self, limit: int) -> list[Frame]:
        n = min(limit, self.ring.pending(self.taken))
        out = []
        for _ in range(n):
            image, (index, t, capture) = self.ring.view(self.taken)
            out.append(Frame(self.name, index, t, image, capture=capture, seq=self.taken))
            self.taken += 1
        if not out and self.ring.header[STATE] == FAILED:
            self.owner.check()
        return out

    def release(self, frames: list[Frame]) -> None:
        if frames:
            self.ring.release(max(f.seq for f in frames) + 1)

    def depth(self) -> int:
        return self.ring.pending(int(self.ring.header[READ]))

    @property
    def finished(self) -> bool:
        return self.ring.header[STATE] != RUNNING and self.ring.pending(self.taken) == 0

    @property
    def dropped(self) -> int:  # type: ignore[override]
        return int(self.ring.header[DROPPED])

    @property
    def late(self) -> int:  # type: ignore[override]
        return int(self.ring.header[LATE])

    def decode_ms(self) -> float | None:
        n = int(self.ring.header[READ]) or self.taken
        return self.ring.header[DECODE_NS] / 1e6 / n if n else None


class QueueFeed(Feed):
    """A feed whose frames a producer thread (``_run``, written by subclasses) puts into a queue: the consumer side
    (``poll``, ``depth``, ``finished``, ``decode_ms``) and the thread's start, shared by the thread and NVDEC feeds."""

    def _start(self, *, slots: int, thread_name: str) -> None:
        self._open_queue(slots=slots)
        self.thread = threading.Thread(target=self._run, daemon=True, name=thread_name)
        self.thread.start()

    def _open_queue(self, *, slots: int) -> None:
        """The consumer side's state (``slots`` 0: unbounded), for a producer run by someone else's thread."""
        self.q: queue.Queue = queue.Queue(maxsize=slots)
        self.error: BaseException | None = None
        self._ended = False
        self.stop = threading.Event()
        self.dropped = self.late = 0
        self.decode_s, self.decoded = 0.0, 0

    def _run(self) -> None:
        raise NotImplementedError

    def poll(self, limit: int) -> list[Frame]:
        out = []
        while len(out) < limit:
            try:
                out.append(self.q.get_nowait())
            except queue.Empty:
                break
        if not out and self.error is not None:
            raise self.error
        return out

    def depth(self) -> int:
        return self.q.qsize()

    @property
    def finished(self) -> bool:
        return self._ended and self.q.empty()

    def decode_ms(self) -> float | None:
        return self.decode_s * 1e3 / self.decoded if self.decoded else None


class ThreadFeed(QueueFeed):
    """One reader thread per source (live streams, image folders, ``--decode thread``); ``read()`` runs in it, and
    with ``pacing`` it keeps the source's time like :func:`_step` does."""

    decode = "thread"

    def __init__(self, name: str, src, *, max_frames: int | None, slots: int, pacing: Pacing | None) -> None:
        self.name, self.src, self.max_frames, self.pacing = name, src, max_frames, pacing
        self._start(slots=slots, thread_name=f"deploy-read-{name}")

    def _run(self) -> None:
        try:
            k = 0
            paced = self.pacing is not None and not getattr(self.src, "live", False)
            while not self.stop.is_set() and (self.max_frames is None or k < self.max_frames):
                if paced:
                    fps = getattr(self.src, "fps", 25.0)
                    wait = self.pacing.due(k, fps, stream=self.name) - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    elif hasattr(self.src, "skip") and time.monotonic() >= self.pacing.due(k + 1, fps,
                                                                                           stream=self.name):
                        self.late += 1
                        k += 1
                        if not self.src.skip():
                            break
                        continue
                t = time.perf_counter()
                frame = self.src.read()
                if frame is None:
                    break
                self.decode_s += time.perf_counter() - t
                self.decoded += 1
                if paced:
                    frame.capture = self.pacing.due(k, getattr(self.src, "fps", 25.0), stream=self.name)
                    try:
                        self.q.put_nowait(frame)
                    except queue.Full:
                        self.dropped += 1
                else:
                    while not self.stop.is_set():
                        try:
                            self.q.put(frame, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                k += 1
        except BaseException as e:  # noqa: BLE001  (raised by the pipeline)
            self.error = e
        finally:
            self._ended = True

    def close(self) -> None:
        self.stop.set()
        if hasattr(self.src, "stop"):
            self.src.stop()
        self.thread.join(timeout=5)
        if not self.thread.is_alive():  # one still blocked inside OpenCV's read: releasing under it is unsafe
            self.src.close()
