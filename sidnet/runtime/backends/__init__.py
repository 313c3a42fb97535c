"""Backends behind one interface (one module each, imported only when chosen).

A backend has ``info`` (:class:`~sidnet.runtime.artifact.ArtifactInfo`), ``max_batch`` (``None``: any) and
``infer(images) -> (dets, num)``: ``images`` float32 (N, 3, S, S) RGB in [0, 1], letterboxed (the exported input
contract); ``dets`` float32 (N, K, 6) ``[x1, y1, x2, y2, score, class]`` in input pixels, score-descending, and
``num`` (N,) valid rows, both NumPy; an instance-segmentation artifact (Mask R-CNN) returns a third array, ``masks``
(N, K, M, M) float32 mask probabilities inside each row's box. Backends that letterbox on the GPU (``torch``,
``compiled``) also have ``infer_frames(frames) -> (dets, num, infos)`` taking RGB uint8 frames of any size.
``close()`` frees the device.
"""

from __future__ import annotations

import importlib

MODULES = {"tensorrt": "tensorrt", "onnxruntime": "onnxruntime", "torch": "torch", "compiled": "compiled",
           "triton": "triton"}  # fmt: skip


def load_backend(backend: str, path, **options):
    """Open ``path`` with ``backend`` (its module's ``open_backend(path, **options)``)."""
    name = MODULES[backend]
    if backend == "torch" and str(path).lower().endswith(".onnx"):  # an INT8 Q/DQ export on the INT8 tensor cores
        name = "torch_int8"
    module = importlib.import_module(f"sidnet.runtime.backends.{name}")
    return module.open_backend(path, **options)
