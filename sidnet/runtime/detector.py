"""``Detector``: load an artifact, run batched inference on RGB frames of any size, get boxes in frame pixels.

    with Detector("runs/sidnet/export/model.onnx") as det:       # backend chosen from the file
        results = det(frames)                                      # list of (H, W, 3) uint8 RGB
        results[0].boxes, results[0].scores, results[0].classes   # original pixels, NMS done

Letterbox in (CPU, :func:`sidnet.letterbox.letterbox`, the one used in training and evaluation; on the GPU for the
``torch`` and ``compiled`` backends), backend, then threshold + NMS + un-letterbox
(:func:`sidnet.runtime.nms.finalize`).
Torch is imported only by the ``torch`` and ``compiled`` backends.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sidnet.letterbox import LetterboxInfo, letterbox
from sidnet.runtime.artifact import backend_for
from sidnet.runtime.backends import load_backend
from sidnet.runtime.errors import DeployError
from sidnet.runtime.nms import Detections, finalize

DEFAULT_CONF = 0.3  # the SIDNet report's operating point


@dataclass
class Prepared:
    """A frame made ready for a backend: ``image`` is the letterboxed float32 (3, S, S) array, or the RGB frame
    itself for backends that letterbox on the GPU (``info`` is then filled in by the backend)."""

    image: np.ndarray
    info: LetterboxInfo | None


class Detector:
    """One artifact, one backend, one interface.

    Args:
        artifact: ``.engine`` (+ sidecar), ``.onnx``, ``.pt`` checkpoint or ``.pt2`` AOTInductor package.
        backend: must match the artifact when given (an error otherwise, never a conversion).
        conf_thresh: score threshold (default 0.3); must not be below the artifact's own export threshold.
        nms_iou, max_det: class-wise NMS IoU and the most detections kept per image.
        options: backend-specific (``device``, ``threads``, ``plugin_library``, ``graphs`` …).
    """

    def __init__(self, artifact: str | Path, *, backend: str | None = None, conf_thresh: float = DEFAULT_CONF,
                 nms_iou: float = 0.45, max_det: int = 100, **options) -> None:  # fmt: skip
        path = Path(artifact)
        self.backend_name = backend_for(path, backend)
        if not 0.0 <= conf_thresh < 1.0:
            raise DeployError(f"confidence threshold {conf_thresh} must be in [0, 1)")
        if self.backend_name == "torch":
            options.setdefault("conf_thresh", conf_thresh)
        self.backend = load_backend(self.backend_name, path, **options)
        self.info = self.backend.info
        if conf_thresh < self.info.conf_thresh:
            raise DeployError(f"threshold {conf_thresh} is below {path.name}'s export threshold "
                              f"{self.info.conf_thresh}: rows under it are already gone; raise --conf or re-export "
                              "with a lower conf_thresh")  # fmt: skip
        self.conf_thresh, self.nms_iou, self.max_det = conf_thresh, nms_iou, max_det
        self.gpu_preprocess = bool(getattr(self.backend, "gpu_preprocess", False))

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    @property
    def max_batch(self) -> int | None:
        return self.backend.max_batch

    def prepare(self, frame: np.ndarray) -> Prepared:
        """CPU part of preprocessing (thread-safe; the pipeline runs it in its decode threads)."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise DeployError(f"expected an (H, W, 3) uint8 RGB frame, got {frame.dtype} {frame.shape}")
        if self.gpu_preprocess:
            return Prepared(frame, None)
        image, _, info = letterbox(frame, np.zeros((0, 4)), size=self.info.input_size)
        return Prepared(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / 255.0, info)

    def detect_prepared(self, batch: Sequence[Prepared], *, timings: dict | None = None) -> list[Detections]:
        """Run prepared frames, in chunks of the backend's ``max_batch``; ``timings`` accumulates seconds under
        ``inference`` and ``postprocess``."""
        out: list[Detections] = []
        step = self.max_batch or len(batch) or 1
        for start in range(0, len(batch), step):
            chunk = batch[start : start + step]
            t0 = time.perf_counter()
            if self.gpu_preprocess:
                dets, num, infos = self.backend.infer_frames([p.image for p in chunk])
            else:
                dets, num = self.backend.infer(np.stack([p.image for p in chunk]))
                infos = [p.info for p in chunk]
            t1 = time.perf_counter()
            out += finalize(dets, num, infos, conf_thresh=self.conf_thresh, nms_iou=self.nms_iou,
                            max_det=self.max_det)  # fmt: skip
            _add(timings, inference=t1 - t0, postprocess=time.perf_counter() - t1)
        return out

    def submit(self, frames: Sequence, *, timings: dict | None = None) -> dict:
        """Start detecting a batch of RGB uint8 frames (host arrays, or CUDA tensors for a GPU backend); returns a
        handle for :meth:`collect`. A GPU backend uploads and replays one CUDA graph (letterbox + network + top-K)
        and returns at once, so the caller can gather the next batch meanwhile; other backends run it all here.
        ``timings`` accumulates seconds under ``preprocess`` (CPU letterbox, or upload + launch), ``inference`` and
        ``postprocess``."""
        t0 = time.perf_counter()
        fits = len(frames) <= (self.max_batch or len(frames))
        if self.gpu_preprocess and hasattr(self.backend, "submit_frames") and fits:
            handle = {"backend": self.backend.submit_frames(frames)}
            _add(timings, preprocess=time.perf_counter() - t0)
            return handle
        prepared = [self.prepare(f) for f in frames]
        _add(timings, preprocess=time.perf_counter() - t0)
        return {"result": self.detect_prepared(prepared, timings=timings)}

    def ready(self, handle: dict) -> bool:
        """Whether :meth:`collect` would return without waiting."""
        return "result" in handle or self.backend.ready(handle["backend"])

    def collect(self, handle: dict, *, timings: dict | None = None) -> list[Detections]:
        """Wait for a :meth:`submit` batch; threshold + NMS + un-letterbox for the whole batch at once."""
        if "result" in handle:
            return handle["result"]
        t0 = time.perf_counter()
        dets, num, infos = self.backend.collect(handle["backend"])
        t1 = time.perf_counter()
        out = finalize(dets, num, infos, conf_thresh=self.conf_thresh, nms_iou=self.nms_iou, max_det=self.max_det)
        _add(timings, inference=t1 - t0, postprocess=time.perf_counter() - t1)
        return out

    def __call__(self, frames: Sequence[np.ndarray]) -> list[Detections]:
        return self.detect_prepared([self.prepare(f) for f in frames])

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _add(timings: dict | None, **seconds: float) -> None:
    if timings is not None:
        for k, v in seconds.items():
            timings[k] = timings.get(k, 0.0) + v
