"""Training batches prepared ahead on a background thread (``loader.device_prefetch``).

With ``loader.cache=device`` + ``gpu_aug`` a batch's preparation — gathering and mosaicking the cached images,
the batch augmentation, the host-to-device copy of the boxes — is ~450 small device operations that the main thread
used to queue between two training steps (~11 ms per batch of 64 on the H100, loader-only 5,000+ img/s), while the
step itself is bound by the host queueing its ~1,400 kernels (benchmarks/results/loader/README.md §7). PyTorch
releases the GIL while it dispatches and launches an operation, so a second thread queueing the next batch's work
on a CUDA stream of its own overlaps most of it with the step.

The batch a step gets is the one it would have prepared itself: the same function on the same inputs (every random
draw comes from the seed the sampler handed out with the sample), only earlier and on another stream; the main
stream waits for the batch's event (a device-side wait, the host never blocks) and each tensor is recorded on the
main stream so the caching allocator does not reuse its memory while the step still reads it. The side stream
first waits for the main stream's work queued before the epoch (the device cache's upload among it), on the device.

A CUDA graph capture on the main thread must not overlap another thread's CUDA calls (the capture's global mode
refuses a ``cudaMalloc`` anywhere in the process): the worker holds ``lock`` while it issues a batch's work, and
:class:`sidnet.engine.graphs.GraphedForward` takes the same lock around its captures.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")
_DONE = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


class DevicePrefetcher(Generic[T, R]):
    """Iterate ``prepare(i, batch)`` over ``enumerate(batches)``, computed up to ``depth`` batches ahead by a
    background thread (on CUDA on a side stream of ``device``). Errors raised there are raised here, with their
    traceback; leaving the loop early (``break``) stops and joins the thread."""

    def __init__(self, batches: Iterable[T], prepare: Callable[[int, T], R], *, device: torch.device,
                 depth: int = 2, lock: threading.Lock | None = None) -> None:  # fmt: skip
        if depth < 1:
            raise ValueError(f"depth={depth} is invalid: prefetch at least 1 batch ahead")
        self.batches, self.prepare, self.device, self.depth = batches, prepare, device, depth
        self.lock = lock if lock is not None else threading.Lock()

    def __iter__(self) -> Iterator[R]:
        cuda = self.device.type == "cuda"
        # the thread's current device: "cuda" without an index means the current one of the thread that iterates
        index = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if cuda else None
        stream = torch.cuda.Stream(self.device) if cuda else None
        if cuda:  # what the iterating thread queued before (the device cache's upload, say) is done before we read it
            stream.wait_stream(torch.cuda.current_stream(self.device))
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                if cuda:
                    torch.cuda.set_device(index)
                for i, batch in enumerate(self.batches):
                    if stop.is_set():
                        return
                    with self.lock:
                        if cuda:
                            with torch.cuda.stream(stream):
                                out = self.prepare(i, batch)
                                event = torch.cuda.Event()
                                event.record(stream)
                        else:
                            out, event = self.prepare(i, batch), None
                    if not put((out, event)):
                        return
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                put(_Failed(e))
                return
            put(_DONE)

        thread = threading.Thread(target=work, name="sidnet-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                out, event = item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for t in _tensors(out):
                        if t.is_cuda:
                            t.record_stream(current)
                yield out
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    ready.get(timeout=0.05)
                except queue.Empty:
                    pass
            thread.join()
