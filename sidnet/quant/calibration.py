"""INT8 calibration data and activation ranges, streamed: images → deployment preprocessing → batches → histograms.

The calibration images go through exactly the deployment contract (:data:`sidnet.graph.onnx_export.PREPROCESSING`):
decode as RGB, :func:`sidnet.data.transforms.letterbox` (the one implementation train/eval/deploy share), CHW
float32 in [0, 1]. Batches are produced one at a time and folded into per-tensor statistics, so memory holds one
batch of activations plus one 2048-bin histogram per tensor, whatever the number of batches (the SIDNet report
calibrated on 1,000 batches of 8).

Methods (TensorRT's names where they exist), all symmetric (INT8 scale = amax / 127):

- ``minmax``: amax = the largest |x| seen;
- ``percentile``: amax = the ``percentile``-th percentile of |x| (default 99.99), from the histogram;
- ``entropy``: TensorRT's EntropyCalibration2: the amax whose 128-level quantized histogram is closest (KL
  divergence) to the clipped reference histogram.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from sidnet.data.transforms import letterbox
from sidnet.data.validate import Checker, check_image
from sidnet.graph.errors import ExportError
from sidnet.safety import read_image

log = logging.getLogger("sidnet.quant.qdq")

METHODS = ("entropy", "minmax", "percentile")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
NUM_BINS = 2048
CACHE_HEADERS = {"entropy": "EntropyCalibration2", "minmax": "MinMaxCalibration", "percentile": "PercentileCalibration"}


class CalibrationError(ExportError):
    """The calibration set or a calibration cache cannot be used (one line: which file/value, what to do)."""


# -- the image set -----------------------------------------------------------------------------------------------------
def folder_images(folder: str | Path) -> list[Path]:
    """Sorted image files directly in ``folder`` (jpg/jpeg/png/bmp/webp)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"calibration folder not found: {folder}; pass a folder of images (int8.images=...)")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    checker = Checker(lenient=True)  # header check: an undecodable file is a failure, never a calibration image
    paths = [p for p in paths if check_image(p, checker=checker) is not None]
    if checker.report.total:  # the first one was logged by the report itself
        log.warning("calibration: %d file(s) in %s are not usable images, counted as failures and not used: %s",
                    checker.report.total, folder, checker.report.counts)  # fmt: skip
    if not paths:
        raise CalibrationError(
            f"calibration folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); point int8.images at "
            "deployment-like frames"
        )
    return paths


def calibration_set(*, images: str | None, data: str | None, split: str, size: int, batches: int, batch_size: int,
                    project_root: Path) -> tuple[CalibrationSet, str]:  # fmt: skip
    """The images from ``images`` (a folder) or ``data`` (a data YAML) split ``split``, and a line naming the source
    (the export's ``--calib-images`` / ``--calib-data``, QAT's ``quant.calib_images`` / ``quant.calib_data``)."""
    if bool(images) == bool(data):
        raise CalibrationError(
            "INT8 needs a calibration set: pass exactly one of --calib-images FOLDER or --calib-data conf/data/X.yaml"
        )
    if images:
        paths, source = folder_images(images), f"folder {images}"
    else:
        paths, source = [r.path for r in split_records(data, split, project_root=project_root)], f"{data} split {split}"
        if not paths:
            raise CalibrationError(f"{data} split {split} has no images to calibrate with")
    return CalibrationSet(list(paths), size=size, batch_size=batch_size, batches=batches), source


def split_records(data_yaml: str, split: str, *, project_root: Path) -> list:
    """The validated records of ``split`` of a data YAML; a missing file or bad data raises CalibrationError."""
    from sidnet.data.config import load_data_yaml
    from sidnet.data.errors import DataError
    from sidnet.data.loading import load_records

    path = Path(data_yaml)
    if not path.is_file():
        raise CalibrationError(f"data config not found: {path}; pass a YAML from conf/data/")
    try:
        return load_records(load_data_yaml(path, project_root=project_root), split, project_root=project_root)
    except (DataError, FileNotFoundError) as e:
        raise CalibrationError(str(e)) from e


@dataclass
class CalibrationSet:
    """The images a calibration reads, in order, and how they are batched.

    ``batches`` is an upper bound: ``min(batches, len(paths) // batch_size)`` full batches are used (a partial last
    batch is dropped, as TensorRT's calibrators do).
    """

    paths: list[Path]
    size: int
    batch_size: int = 8
    batches: int = 1000

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.batches < 1:
            raise CalibrationError(
                f"int8.batch_size={self.batch_size} and int8.batches={self.batches} must both be >= 1"
            )
        if len(self.paths) < self.batch_size:
            raise CalibrationError(
                f"{len(self.paths)} calibration image(s) for a batch of {self.batch_size}: add images or lower "
                f"int8.batch_size (--calib-batch-size; at least one full batch is needed)"
            )

    @property
    def num_batches(self) -> int:
        return min(self.batches, len(self.paths) // self.batch_size)

    @property
    def used(self) -> list[Path]:
        return self.paths[: self.num_batches * self.batch_size]

    def digest(self) -> str:
        """sha256 over the used images' names and bytes, in order: the manifest's calibration image-list hash."""
        h = hashlib.sha256()
        for p in self.used:
            h.update(p.name.encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
        return h.hexdigest()

    def __iter__(self) -> Iterator[np.ndarray]:
        """float32 [batch_size, 3, S, S] batches, RGB in [0, 1], letterboxed (the deployment preprocessing)."""
        used = self.used
        for start in range(0, len(used), self.batch_size):
            yield np.stack([preprocess(p, self.size) for p in used[start : start + self.batch_size]])


def preprocess(path: Path, size: int) -> np.ndarray:
    """One image file → float32 [3, S, S] exactly as deployed (decode RGB, letterbox, / 255)."""
    try:
        image = read_image(path, what="calibration image", fix="remove or replace it", exif_orientation=False)
    except ValueError as e:
        raise CalibrationError(str(e)) from e
    boxed, _, _ = letterbox(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), np.zeros((0, 4)), size=size)
    return np.ascontiguousarray(boxed.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)


# -- streaming statistics ---------------------------------------------------------------------------------------------
class AbsHistogram:
    """Histogram of |x| over [0, edge] in :data:`NUM_BINS` bins; the range doubles (merging bin pairs) as needed."""

    def __init__(self) -> None:
        self.counts = np.zeros(NUM_BINS, dtype=np.int64)
        self.edge = 0.0
        self.amax = 0.0

    def add(self, x: np.ndarray) -> None:
        a = np.abs(x.astype(np.float32, copy=False)).ravel()
        top = float(a.max()) if a.size else 0.0
        self.amax = max(self.amax, top)
        if top <= 0.0:
            self.counts[0] += a.size
            return
        if self.edge == 0.0:
            self.edge = top
        while top > self.edge:  # double the range: bin i and i+1 merge into bin i // 2
            merged = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.concatenate([merged, np.zeros(NUM_BINS // 2, np.int64)])
            self.edge *= 2.0
        idx = np.minimum((a * (NUM_BINS / self.edge)).astype(np.int64), NUM_BINS - 1)
        self.counts += np.bincount(idx, minlength=NUM_BINS)

    def percentile(self, p: float) -> float:
        total = self.counts.sum()
        if total == 0 or self.edge == 0.0:
            return 0.0
        i = int(np.searchsorted(np.cumsum(self.counts), total * p / 100.0))
        return min(self.amax, (i + 1) * self.edge / NUM_BINS)

    def entropy(self, levels: int = 128, step: int = 8) -> float:
        """TensorRT EntropyCalibration2: the clip bin ``i`` minimising KL(P_i || Q_i); candidates every ``step``."""
        hist = self.counts.astype(np.float64)
        hist[0] = 0.0  # ReLU zeros are exact in INT8 and would dominate the distributions
        nz = np.nonzero(hist)[0]
        if nz.size == 0:
            return self.amax
        last = int(nz[-1]) + 1
        best, best_i = np.inf, last
        for i in range(min(levels, last), last + 1, step):
            p = hist[:i].copy()
            p[i - 1] += hist[i:].sum()  # clipped outliers land in the last bin
            # Q: the same i bins merged into `levels` levels, each level spread over its non-empty bins.
            chunks = np.array_split(hist[:i], levels)
            q = np.concatenate([np.where(c > 0, c.sum() / max(np.count_nonzero(c), 1), 0.0) for c in chunks])
            p_sum, q_sum = p.sum(), q.sum()
            if q_sum == 0:
                continue
            mask = p > 0
            qm = np.maximum(q[mask] / q_sum, 1e-12)
            kl = float(np.sum((p[mask] / p_sum) * np.log((p[mask] / p_sum) / qm)))
            if kl < best:
                best, best_i = kl, i
        return min(self.amax, (best_i + 0.5) * self.edge / NUM_BINS)


def activation_amax(stats: dict[str, AbsHistogram], *, method: str, percentile: float = 99.99) -> dict[str, float]:
    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}: use {', '.join(METHODS)}")
    if method == "minmax":
        return {k: s.amax for k, s in stats.items()}
    if method == "percentile":
        if not 0.0 < percentile <= 100.0:
            raise CalibrationError(f"int8.percentile={percentile} must be in (0, 100], e.g. 99.99")
        return {k: s.percentile(percentile) for k, s in stats.items()}
    return {k: s.entropy() for k, s in stats.items()}


def collect_statistics(model_bytes: bytes, tensors: Sequence[str], calib: CalibrationSet) -> dict[str, AbsHistogram]:
    """Run ``model_bytes`` (an FP32 ONNX) in onnxruntime over ``calib``, one batch at a time, with ``tensors``
    exposed as outputs; returns one streaming |x| histogram per tensor. A tqdm bar shows the batches."""
    import onnx
    import onnxruntime as ort

    from sidnet.graph.wrapper import INPUT_NAME
    from sidnet.progress import progress

    model = onnx.load_from_string(model_bytes)
    model.graph.ClearField("output")
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # requested outputs are kept
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    stats = {t: AbsHistogram() for t in tensors}
    for batch in progress(calib, total=calib.num_batches, desc="int8 calibration", unit="batch"):
        for name, value in zip(tensors, session.run(list(tensors), {INPUT_NAME: batch}), strict=True):
            stats[name].add(value)
    return stats


# -- TensorRT calibration cache (text) ---------------------------------------------------------------------------------
def cache_text(scales: dict[str, float], *, method: str, trt_version: str) -> str:
    """TensorRT's calibration-table format: a ``TRT-<version>-<Calibrator>`` header, then ``name: <hex>`` where
    ``<hex>`` is the big-endian IEEE-754 float32 bit pattern of the INT8 scale (amax / 127)."""
    lines = [f"TRT-{trt_version}-{CACHE_HEADERS[method]}"]
    for name, scale in scales.items():
        lines.append(f"{name}: {struct.pack('>f', float(scale)).hex()}")
    return "\n".join(lines) + "\n"


def read_cache(path: str | Path) -> tuple[str, dict[str, float]]:
    """(header, {tensor: scale}) of a TensorRT calibration cache; a malformed file raises CalibrationError."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"calibration cache {path} cannot be read ({type(e).__name__}); rebuild it") from e
    if not lines or not lines[0].startswith("TRT-"):
        raise CalibrationError(f"{path} is not a TensorRT calibration cache (no 'TRT-<version>-...' header)")
    scales = {}
    for n, line in enumerate(lines[1:], start=2):
        name, sep, value = line.rpartition(": ")
        try:
            scales[name] = struct.unpack(">f", bytes.fromhex(value))[0]
        except ValueError as e:
            raise CalibrationError(f"{path} line {n} is not 'tensor: <8 hex digits>': {line[:80]!r}") from e
        if not sep:
            raise CalibrationError(f"{path} line {n} is not 'tensor: <8 hex digits>': {line[:80]!r}")
    return lines[0], scales
