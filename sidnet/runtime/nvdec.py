"""Video decoding on the GPU's NVDEC through PyNvVideoCodec (``pip install pynvvideocodec``, optional): frames are
decoded straight into device memory as RGB, copied into a per-stream ring of CUDA tensors, and the pipeline's
batch upload becomes a device-to-device copy. Imported only for ``--decode nvdec``.

When NVDEC cannot be used (no PyNvVideoCodec, a CPU backend, a codec or file the decoder refuses), the pipeline says
so in a warning and in ``summary.json``'s ``decode`` entry and decodes that stream in CPU processes instead: never a
silent change of path.
"""

from __future__ import annotations

import logging
import queue
import time

from sidnet.runtime.decode import Pacing, QueueFeed
from sidnet.runtime.sources import Frame, VideoFileSource

log = logging.getLogger("sidnet.runtime")


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
    """A decoded RGB frame (DLPack / CUDA array interface) → (H, W, 3) uint8 CUDA tensor, without a copy."""
    try:
        t = torch.from_dlpack(frame)
    except (TypeError, RuntimeError, AttributeError, BufferError):
        t = torch.as_tensor(frame, device="cuda")
    if t.ndim == 3 and t.shape[0] == 3 and t.shape[-1] != 3:
        t = t.permute(1, 2, 0)
    return t


class NvdecFeed(QueueFeed):
    decode = "nvdec"

    def __init__(self, name: str, src: VideoFileSource, *, device, slots: int, max_frames: int | None,
                 pacing: Pacing | None) -> None:  # fmt: skip
        import PyNvVideoCodec as nvc
        import torch

        self.name, self.src, self.max_frames, self.pacing, self.torch = name, src, max_frames, pacing, torch
        self.fps = src.fps
        w, h = src.size
        self.stream = torch.cuda.Stream(device)
        self.decoder = nvc.SimpleDecoder(str(src.path), gpu_id=device.index or 0, use_device_memory=True,
                                         cuda_stream=self.stream.cuda_stream,
                                         output_color_type=nvc.OutputColorType.RGB)  # fmt: skip
        self.ring = torch.empty((slots, h, w, 3), dtype=torch.uint8, device=device)
        self.free: queue.Queue = queue.Queue()
        for i in range(slots):
            self.free.put(i)
        self.seq = 0
        self._start(slots=0, thread_name=f"deploy-nvdec-{name}")  # unbounded: the free slots bound it

    def _frames(self, chunk: int = 8):
        while True:
            with self.torch.cuda.stream(self.stream):
                got = self.decoder.get_batch_frames(chunk)
            if not got:
                return
            yield from got

    def _run(self) -> None:
        try:
            frames = self._frames()
            k = 0
            while not self.stop.is_set() and (self.max_frames is None or k < self.max_frames):
                due = self.pacing.due(k, self.fps) if self.pacing is not None else None
                if due is not None and due > time.monotonic():
                    time.sleep(due - time.monotonic())
                t = time.perf_counter()
                capture = time.monotonic() if due is None else due
                decoded = next(frames, None)
                if decoded is None:
                    break
                if due is not None and time.monotonic() >= self.pacing.due(k + 1, self.fps):
                    self.late += 1
                    k += 1
                    continue
                try:
                    slot = self.free.get(timeout=None if due is None else 0)
                except queue.Empty:
                    self.dropped += 1
                    k += 1
                    continue
                with self.torch.cuda.stream(self.stream):
                    self.ring[slot].copy_(_as_hwc(decoded, self.torch))
                self.stream.synchronize()  # the frame is in our ring before anyone sees it
                self.decode_s += time.perf_counter() - t
                self.decoded += 1
                self.q.put(Frame(self.name, k, k / self.fps, self.ring[slot], capture=capture, seq=slot))
                k += 1
        except BaseException as e:  # noqa: BLE001  (raised by the pipeline)
            self.error = e
        finally:
            self._ended = True

    def release(self, frames: list[Frame]) -> None:
        for f in frames:
            self.free.put(f.seq)

    def close(self) -> None:
        self.stop.set()
        self.free.put(0)  # a producer waiting for a free slot wakes up and sees the stop
        self.thread.join(timeout=5)
        self.decoder = None


class NvdecFeeds:
    """NVDEC feeds for video files; ``failed``: streams whose decoder could not be opened (name → reason)."""

    def __init__(self, files: dict[str, VideoFileSource], *, device, slots: int, max_frames: int | None,
                 pacing: Pacing | None) -> None:  # fmt: skip
        self.feeds: dict[str, NvdecFeed] = {}
        self.failed: dict[str, str] = {}
        for name, src in files.items():
            try:
                self.feeds[name] = NvdecFeed(name, src, device=device, slots=slots, max_frames=max_frames,
                                             pacing=pacing)  # fmt: skip
            except Exception as e:  # noqa: BLE001  (reported, and that stream decodes on the CPU)
                self.failed[name] = f"{type(e).__name__}: {e}"
                log.warning("stream %s: NVDEC cannot decode %s (%s); decoding it in a CPU process", name, src.path,
                            self.failed[name])  # fmt: skip

    def close(self) -> None:
        for f in self.feeds.values():
            f.close()
