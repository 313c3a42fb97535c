"""Video decoding on the GPU's NVDEC through PyNvVideoCodec (``pip install pynvvideocodec``, optional): frames are
decoded straight into device memory as RGB, copied into a per-stream ring of CUDA tensors, and the pipeline's
batch upload becomes one device-to-device gather (:meth:`GraphRunner.submit_frames`). Imported only for
``--decode nvdec``.

Decoding is driven by a few threads (``threads``, streams dealt round-robin, as the decode processes are), not one
thread per stream: each thread decodes up to ``chunk`` frames of a stream per call (no more than its ring's free
slots when unpaced, so that no decoded frame waits outside the ring), copies the frames it hands over into
their ring slots on that stream's CUDA stream and waits for those copies once per hand-over, not once per frame.
With a thread and a host synchronisation per frame per stream (the first version), 32 streams were bound by the
interpreter lock, not by NVDEC: ~1,900 frames/s at 576p and at 1080p alike, and the inference loop waited for the
lock inside every batch (issue 17).

When NVDEC cannot be used (no PyNvVideoCodec, a CPU backend, a codec or file the decoder refuses), the pipeline says
so in a warning and in ``summary.json``'s ``decode`` entry and decodes that stream in CPU processes instead: never a
silent change of path.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque

from sidnet.runtime.decode import Pacing, QueueFeed
from sidnet.runtime.sources import Frame, VideoFileSource

log = logging.getLogger("sidnet.runtime")
CHUNK = 8  # frames per decoder call


def nvdec_unavailable(detector) -> str | None:
    """Why NVDEC decoding cannot feed this detector (None: it can)."""
    device = getattr(detector.backend, "device", None)
    if not detector.gpu_preprocess or device is None or getattr(device, "type", "") != "cuda":
        return f"the {detector.backend_name} backend does not take frames on the GPU (use the torch backend on CUDA)"
    try:
        import PyNvVideoCodec  # noqa: F401
    except ImportError as e:
        return f"PyNvVideoCodec is not installed ({e}; pip install pynvvideocodec)"
    return None


def _as_hwc(frame, torch):
    """A decoded RGB frame (DLPack / CUDA array interface) → (H, W, 3) uint8 tensor, without a copy."""
    try:
        t = torch.from_dlpack(frame)
    except (TypeError, RuntimeError, AttributeError, BufferError):
        t = torch.as_tensor(frame, device="cuda")
    if t.ndim == 3 and t.shape[0] == 3 and t.shape[-1] != 3:
        t = t.permute(1, 2, 0)
    return t


class NvdecFeed(QueueFeed):
    """One stream: its decoder (anything with ``get_batch_frames(n)`` returning DLPack frames, [] at the end), its
    ring of ``(slots, H, W, 3)`` uint8 slots and the consumer side; :meth:`step` is called by a :class:`NvdecFeeds`
    thread. ``stream``: the CUDA stream the decoder and the copies run on (None on a CPU, in tests)."""

    decode = "nvdec"

    def __init__(self, name: str, *, decoder, ring, fps: float, max_frames: int | None, pacing: Pacing | None,
                 stream=None, chunk: int = CHUNK) -> None:  # fmt: skip
        import torch

        self.name, self.decoder, self.ring, self.fps = name, decoder, ring, fps
        self.max_frames, self.pacing, self.stream, self.chunk, self.torch = max_frames, pacing, stream, chunk, torch
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(ring.shape[0]):
            self.free.put(i)
        self.pending: deque = deque()  # decoded by the last decoder call, not handed over yet
        self.pending_capture = 0.0  # when that call started (unpaced: the capture time of its frames)
        self.k = 0  # the next frame's index
        self.exhausted = False
        self._open_queue(slots=0)  # unbounded: the free slots bound it

    # ------------------------------------------------------------------------------------------ producer side
    def _decode(self, n: int) -> list:
        """Up to ``n`` frames from the decoder, on the feed's CUDA stream."""
        ctx = self.torch.cuda.stream(self.stream) if self.stream is not None else _null()
        with ctx:  # the previous call's frames were copied out and waited for: its buffers may be reused
            return self.decoder.get_batch_frames(n)

    def prime(self) -> None:
        """Decode the first chunk now, when the stream is opened: the decoder's start-up (NVDEC session, first
        bitstream parse) is paid like a camera's connection, not counted as the first frames' latency or as a paced
        stream falling behind. Those frames' capture time is the first :meth:`step`."""
        n = min(self.chunk, self.free.qsize(), self.max_frames if self.max_frames is not None else self.chunk)
        got = self._decode(n) if n > 0 else []
        self.pending.extend(got)
        self.exhausted = not got
        self.pending_capture = None  # set by the first step

    def step(self) -> float | None:
        """Hand over what is due: 0.0 when something was done, seconds to wait, None once the stream has ended."""
        if self.stop.is_set() or (self.max_frames is not None and self.k >= self.max_frames):
            return None
        if self.pending_capture is None:
            self.pending_capture = time.monotonic()
        due = self.pacing.due(self.k, self.fps, stream=self.name) if self.pacing is not None else None
        if due is not None and time.monotonic() < due:
            return due - time.monotonic()
        if not self.pending:
            if self.exhausted:
                return None
            # unpaced: decode no more than the free slots take (frames decoded ahead of a full ring would wait, and
            # their capture time is the decoder call's start); paced: a chunk, handed over or dropped when due
            n = self.chunk if due is not None else min(self.chunk, self.free.qsize())
            if n == 0:
                return 0.0005
            t = time.perf_counter()
            self.pending_capture = time.monotonic()
            got = self._decode(n)
            self.decode_s += time.perf_counter() - t
            if not got:
                self.exhausted = True
                return None
            self.pending.extend(got)
        return self._paced(due) if due is not None else self._unpaced()

    def _paced(self, due: float) -> float:
        """Frame ``k`` (due now) as a camera would deliver it: skipped when the decoder reached it more than a period
        late, dropped when the pipeline holds every slot, else handed over with its due time as capture time."""
        decoded = self.pending.popleft()
        k, self.k = self.k, self.k + 1
        if time.monotonic() >= self.pacing.due(k + 1, self.fps, stream=self.name):
            self.late += 1
            return 0.0
        try:
            slot = self.free.get_nowait()
        except queue.Empty:
            self.dropped += 1
            return 0.0
        self._hand_over([(slot, decoded, k)], capture=due)
        return 0.0

    def _unpaced(self) -> float:
        """As many pending frames as there are free slots (a full ring: wait for the pipeline)."""
        out = []
        while self.pending and (self.max_frames is None or self.k < self.max_frames):
            try:
                slot = self.free.get_nowait()
            except queue.Empty:
                break
            out.append((slot, self.pending.popleft(), self.k))
            self.k += 1
        if not out:
            return 0.0005
        self._hand_over(out, capture=self.pending_capture)
        return 0.0

    def _hand_over(self, frames: list[tuple], *, capture: float) -> None:
        """Copy decoded frames into their slots, wait for the copies once, then give them to the consumer."""
        t = time.perf_counter()
        ctx = self.torch.cuda.stream(self.stream) if self.stream is not None else _null()
        with ctx:
            for slot, decoded, _ in frames:
                self.ring[slot].copy_(_as_hwc(decoded, self.torch))
        if self.stream is not None:
            self.stream.synchronize()  # in our ring before anyone sees it, and out of the decoder's buffers
        self.decode_s += time.perf_counter() - t
        self.decoded += len(frames)
        for slot, _, k in frames:
            self.q.put(Frame(self.name, k, k / self.fps, self.ring[slot], capture=capture, seq=slot))

    # ------------------------------------------------------------------------------------------ consumer side
    def release(self, frames: list[Frame]) -> None:
        for f in frames:
            self.free.put(f.seq)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def decode_group(feeds: list[NvdecFeed], stop: threading.Event) -> None:
    """Thread body: step every feed round-robin until all have ended (a feed's error ends it, raised by its poll)."""
    live = list(feeds)
    while live and not stop.is_set():
        wait = 0.002
        for f in list(live):
            try:
                w = f.step()
            except BaseException as e:  # noqa: BLE001  (raised by the pipeline, through the feed's poll)
                f.error, w = e, None
            if w is None:
                f._ended = True
                live.remove(f)
            elif w == 0.0:
                wait = 0.0
            else:
                wait = min(wait, w)
        if wait > 0:
            time.sleep(wait)
    for f in live:  # stopped: the feeds left end here
        f._ended = True


def open_decoder(src: VideoFileSource, *, device, stream, ahead: bool = False):
    """PyNvVideoCodec's SimpleDecoder for ``src``, RGB frames in device memory, working on ``stream``; ``ahead``: its
    ThreadedDecoder instead, which decodes up to two chunks ahead in a native thread of its own, so that the decode
    threads here only hand frames over (``--decode nvdec-ahead``)."""
    import PyNvVideoCodec as nvc

    if ahead:
        return nvc.ThreadedDecoder(str(src.path), 2 * CHUNK, gpu_id=device.index or 0, cuda_stream=stream.cuda_stream,
                                   use_device_memory=True, output_color_type=nvc.OutputColorType.RGB)  # fmt: skip
    return nvc.SimpleDecoder(str(src.path), gpu_id=device.index or 0, use_device_memory=True,
                             cuda_stream=stream.cuda_stream, output_color_type=nvc.OutputColorType.RGB)  # fmt: skip


class NvdecFeeds:
    """NVDEC feeds for video files, decoded by ``threads`` threads; ``failed``: streams whose decoder could not be
    opened (name → reason). ``opener(src, device=, stream=)`` makes a decoder (tests pass a fake one)."""

    def __init__(self, files: dict[str, VideoFileSource], *, device, slots: int, max_frames: int | None,
                 pacing: Pacing | None, threads: int, opener=open_decoder) -> None:  # fmt: skip
        import torch

        self.feeds: dict[str, NvdecFeed] = {}
        self.failed: dict[str, str] = {}
        cuda = getattr(device, "type", "") == "cuda"
        for name, src in files.items():
            try:
                stream = torch.cuda.Stream(device) if cuda else None
                decoder = opener(src, device=device, stream=stream)
                w, h = src.size
                ring = torch.empty((slots, h, w, 3), dtype=torch.uint8, device=device)
                feed = NvdecFeed(name, decoder=decoder, ring=ring, fps=src.fps, max_frames=max_frames, pacing=pacing,
                                 stream=stream)  # fmt: skip
                feed.prime()
                self.feeds[name] = feed
            except Exception as e:  # noqa: BLE001  (reported, and that stream decodes on the CPU)
                self.failed[name] = f"{type(e).__name__}: {e}"
                log.warning("stream %s: NVDEC cannot decode %s (%s); decoding it in a CPU process", name, src.path,
                            self.failed[name])  # fmt: skip
        self.stop = threading.Event()
        n = max(1, min(threads, len(self.feeds)))
        groups = [list(self.feeds.values())[i::n] for i in range(n)]
        self.threads = [threading.Thread(target=decode_group, args=(g, self.stop), daemon=True,
                                         name=f"deploy-nvdec-{i}") for i, g in enumerate(groups) if g]  # fmt: skip
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        for f in self.feeds.values():
            f.stop.set()
        for t in self.threads:
            t.join(timeout=5)
        for f in self.feeds.values():
            f.decoder = None
