"""``onnxruntime`` backend: any ONNX from ``python -m export`` (FP32, FP16, INT8 Q/DQ) on the CPU provider, or the
CUDA provider when ``onnxruntime-gpu`` is installed and ``device="cuda"`` is asked for (never chosen silently)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sidnet.runtime.artifact import ArtifactInfo, onnx_info
from sidnet.runtime.errors import DeployError

INPUT_NAME = "images"
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxRuntimeBackend:
    name = "onnxruntime"
    max_batch = None

    def __init__(self, path: Path, *, device: str = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        self.info: ArtifactInfo = onnx_info(path)
        if any(n.domain == "sidnet" for n in _graph_nodes(path)):
            raise DeployError(f"{path} holds sidnet:: plugin nodes (a --target plugins export) that only TensorRT "
                              "runs: for onnxruntime re-export with --target native")  # fmt: skip
        wanted = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
        if device not in wanted:
            raise DeployError(f"onnxruntime device {device!r}: use cpu or cuda")
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DeployError("onnxruntime has no CUDAExecutionProvider here: pip install onnxruntime-gpu, or use "
                              "--device cpu")  # fmt: skip
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=wanted[device])
        inp = self.session.get_inputs()[0]
        if inp.name != INPUT_NAME or inp.type not in _NP_TYPES:
            raise DeployError(f"{path}: input {inp.name} {inp.type} is not the exported `images` float input; "
                              "re-export with python -m export")  # fmt: skip
        self.dtype = _NP_TYPES[inp.type]
        self.providers = self.session.get_providers()
        self.has_masks = "masks" in [o.name for o in self.session.get_outputs()]  # a Mask R-CNN export
        self.max_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None  # static batch: Mask R-CNN's 1

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        outs = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(images, dtype=self.dtype)})
        dets, num = outs[0].astype(np.float32, copy=False), outs[1]
        return (dets, num, outs[2].astype(np.float32, copy=False)) if self.has_masks else (dets, num)

    def close(self) -> None:
        self.session = None


def _graph_nodes(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.node


def open_backend(path: Path, **options) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(Path(path), **options)
