"""Shared-memory frame rings: decoded frames cross from a decoder process to the inference process without a copy
through a pipe or a pickle.

One :class:`FrameRing` per stream, single producer (the decode worker) and single consumer (the pipeline), in one
anonymous shared buffer (``memfd_create``: RAM, not bounded by the size of ``/dev/shm``, which containers often cap at
64 MB). The consumer process owns it; the worker maps the same pages through ``/proc/<owner pid>/fd/<fd>``.

Layout: a header of int64 counters, per-slot metadata (frame index, stream time, capture time on the monotonic
clock, which is shared by every process of the machine), then ``slots`` frames of (H, W, 3) uint8 RGB. The producer
writes a frame and its metadata, then bumps ``written``; the consumer reads slots ``read … written - 1`` and bumps
``read`` when it is done with them (after their upload). On x86-64 (total store order) the bump is seen after the
data it publishes; other architectures would need a fence.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np

# header fields (int64)
WRITTEN, READ, DROPPED, STATE, STOP, DECODE_NS, LATE = range(7)
HEADER = 16
RUNNING, ENDED, FAILED = 0, 1, 2
META = 3  # index, time, capture


@dataclass(frozen=True)
class RingSpec:
    """What a worker needs to map a ring (picklable)."""

    pid: int
    fd: int
    slots: int
    height: int
    width: int

    @property
    def data_offset(self) -> int:
        """Frames start on a page boundary (so that the range can be page-locked for DMA)."""
        return _page_up(HEADER * 8 + self.slots * META * 8)

    @property
    def data_nbytes(self) -> int:
        return _page_up(self.slots * self.height * self.width * 3)

    @property
    def nbytes(self) -> int:
        return self.data_offset + self.data_nbytes


def _page_up(n: int) -> int:
    page = mmap.PAGESIZE
    return (n + page - 1) // page * page


class FrameRing:
    """``slots`` frames of (H, W, 3) uint8; ``create`` in the consumer, ``attach`` in the producer."""

    def __init__(self, spec: RingSpec, mm: mmap.mmap, fd: int | None) -> None:
        self.spec, self._mm, self._fd = spec, mm, fd
        self.header = np.frombuffer(mm, np.int64, HEADER, 0)
        self.meta = np.frombuffer(mm, np.float64, spec.slots * META, HEADER * 8).reshape(spec.slots, META)
        self.frames = np.frombuffer(mm, np.uint8, spec.slots * spec.height * spec.width * 3, spec.data_offset).reshape(
            spec.slots, spec.height, spec.width, 3)  # fmt: skip

    @classmethod
    def create(cls, *, slots: int, height: int, width: int, name: str = "frames") -> FrameRing:
        fd = os.memfd_create(f"sidnet-{name}", 0)
        spec = RingSpec(os.getpid(), fd, slots, height, width)
        os.ftruncate(fd, spec.nbytes)
        return cls(spec, mmap.mmap(fd, spec.nbytes), fd)

    @classmethod
    def attach(cls, spec: RingSpec) -> FrameRing:
        fd = os.open(f"/proc/{spec.pid}/fd/{spec.fd}", os.O_RDWR)
        try:
            mm = mmap.mmap(fd, spec.nbytes)
        finally:
            os.close(fd)
        return cls(spec, mm, None)

    @property
    def address(self) -> int:
        """Host address of the frame slots (for registering them as pinned memory)."""
        return self.frames.ctypes.data

    # producer side
    def free_slots(self) -> int:
        return self.spec.slots - int(self.header[WRITTEN] - self.header[READ])

    def slot_for_write(self) -> np.ndarray:
        return self.frames[int(self.header[WRITTEN]) % self.spec.slots]

    def publish(self, *, index: int, time: float, capture: float) -> None:
        w = int(self.header[WRITTEN])
        self.meta[w % self.spec.slots] = (index, time, capture)
        self.header[WRITTEN] = w + 1  # after the data and metadata (module docstring)

    # consumer side
    def pending(self, taken: int) -> int:
        """Frames written and not yet taken (``taken``: the consumer's own count)."""
        return int(self.header[WRITTEN]) - taken

    def view(self, n: int) -> tuple[np.ndarray, tuple[int, float, float]]:
        s = n % self.spec.slots
        i, t, c = self.meta[s]
        return self.frames[s], (int(i), float(t), float(c))

    def release(self, upto: int) -> None:
        """Slots before ``upto`` (a taken count) may be overwritten."""
        self.header[READ] = upto

    def close(self) -> None:
        self.header = self.meta = self.frames = None  # drop the views so the map can close
        try:
            self._mm.close()
        except BufferError:  # a frame view is still referenced somewhere: the pages go with the last reference
            pass
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
