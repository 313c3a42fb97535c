"""``tensorrt`` backend: a serialized engine + its sidecar, device memory and streams through **pycuda**, no torch.

Before a byte of the engine is deserialised, :func:`check_sidecar` compares the sidecar that ``python -m export``
wrote with this machine: TensorRT flavour and version (engines are not portable across versions), GPU compute
capability, the engine file's SHA-256, the plugin library (``sidnet::`` plugins: present, and the same build the
engine was made with), and the precision manifest (an INT8 engine must carry its calibration manifest). Then
:class:`TensorRTBackend` deserialises, allocates one pinned host and one device buffer per I/O tensor for the
profile's largest batch, and runs ``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` on its own
stream (TensorRT's detectron2 ``infer.py`` pattern, one object owning engine, context and buffers).

**What has run:** the sidecar checks and the binding plan (CI, host side). **What has not:** deserialising and
executing an engine: full TensorRT is not installable on the project's machines and TensorRT-RTX engines cannot run
on the H100 (``../shared/docs/platform.md``); pycuda is installed on the GPU machine only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sidnet.io import sha256_file
from sidnet.runtime.artifact import ArtifactInfo, sidecar_info
from sidnet.runtime.errors import DeployError

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
PRECISIONS = ("fp32", "fp16", "int8")
_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "INT8": np.int8,
           "BOOL": np.bool_, "UINT8": np.uint8}  # fmt: skip


def check_sidecar(
    side: dict[str, Any],
    *,
    engine: Path,
    runtime: str,
    runtime_version: str,
    compute_capability: str | None,
    plugin_library: str | os.PathLike | None = None,
) -> dict[str, str] | None:
    """Raise :class:`DeployError` when the engine cannot (or must not) be deserialised here; returns the plugin
    library to register (``{"library": path}``) or ``None`` when the engine has no plugins.

    ``runtime``/``runtime_version``: the importable flavour (``tensorrt`` or ``tensorrt-rtx``) and its version;
    ``compute_capability`` ``"9.0"`` of the GPU that will run it; ``plugin_library``: an explicit
    ``libsidnet_kernels.so`` (else ``$SIDNET_KERNELS_LIB``, else the path recorded at build time).
    """
    built_with = side.get("backend")
    if built_with not in MODULES:
        raise DeployError(f"{engine}: sidecar names backend {built_with!r}; expected tensorrt or tensorrt-rtx")
    if built_with != runtime:
        raise DeployError(f"{engine} was built by {built_with} but this runtime is {runtime}: the plans are not "
                          f"interchangeable; rebuild with python -m export --backend {runtime}")  # fmt: skip
    if str(side.get("backend_version")) != str(runtime_version):
        raise DeployError(f"{engine} was built with {built_with} {side.get('backend_version')}, this machine has "
                          f"{runtime_version}: engines only load in the version that built them; rebuild it here "
                          "with python -m export")  # fmt: skip
    want_cc = side.get("compute_capability")
    if compute_capability is None:
        raise DeployError(f"{engine}: no CUDA GPU visible (pycuda found none); a TensorRT engine needs one")
    if want_cc is not None and str(want_cc) != str(compute_capability):
        raise DeployError(f"{engine} was built for compute capability {want_cc} ({side.get('gpu')}), this GPU is "
                          f"{compute_capability}: rebuild the engine on this GPU")  # fmt: skip
    digest = side.get("engine_sha256")
    if digest and sha256_file(engine) != digest:
        raise DeployError(f"{engine} does not match its sidecar's engine_sha256 (a different or damaged file): "
                          "re-export, or put the sidecar that came with this engine beside it")  # fmt: skip
    precision = side.get("precision")
    if precision not in PRECISIONS:
        raise DeployError(f"{engine}: sidecar precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "int8" and not side.get("int8"):
        raise DeployError(f"{engine} is INT8 but its sidecar has no `int8` manifest (calibration set, method, "
                          "scales): re-export it with python -m export --precision int8")  # fmt: skip
    plugins = side.get("plugins")
    if not plugins:
        return None
    lib = Path(plugin_library or os.environ.get("SIDNET_KERNELS_LIB") or plugins.get("library", ""))
    if not lib.is_file():
        raise DeployError(f"{engine} uses the sidnet:: plugins but the kernels library {lib} is missing: build it "
                          "(python -m sidnet.kernels.build) or pass --plugin-library")  # fmt: skip
    if plugins.get("sha256") and sha256_file(lib) != plugins["sha256"]:
        raise DeployError(f"{engine} was built against a different {lib.name} (sha256 differs from the sidecar's): "
                          "use the library the engine was built with, or rebuild the engine")  # fmt: skip
    return {"library": str(lib)}


@dataclass
class Binding:
    name: str
    is_input: bool
    dtype: Any
    shape: tuple[int, ...]  # for the largest batch of the profile

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def plan_bindings(tensors: list[tuple[str, bool, str, tuple[int, ...]]], *, max_batch: int) -> list[Binding]:
    """(name, is_input, TensorRT dtype name, shape with -1 for the batch) → buffers sized for ``max_batch``.

    The exported engine has one input ``images`` (-1, 3, S, S) and outputs ``detections`` (-1, K, 6) and
    ``num_detections`` (-1,); only the batch axis may be dynamic.
    """
    out = []
    for name, is_input, dtype, shape in tensors:
        if dtype not in _DTYPES:
            raise DeployError(f"engine tensor {name} has dtype {dtype}, which this runtime does not handle")
        if any(d < 0 for d in shape[1:]) or not shape:
            raise DeployError(f"engine tensor {name} has shape {shape}: only the batch axis may be dynamic")
        out.append(Binding(name, is_input, _DTYPES[dtype], (max_batch if shape[0] < 0 else shape[0], *shape[1:])))
    names = {b.name for b in out}
    if not {"images", "detections", "num_detections"} <= names:
        raise DeployError(f"engine I/O {sorted(names)} is not the exported contract (images → detections, "
                          "num_detections): re-export with python -m export")  # fmt: skip
    return out


def _import_trt(flavour: str):
    import importlib

    try:
        return importlib.import_module(MODULES[flavour])
    except ImportError as e:
        raise DeployError(f"backend tensorrt needs the {flavour} Python package ({e}): pip install tensorrt-cu12 "
                          "(NVIDIA's index), or run the .onnx with onnxruntime") from e  # fmt: skip


def _import_pycuda():
    try:
        import pycuda.driver as cuda
    except ImportError as e:
        raise DeployError(f"backend tensorrt needs pycuda ({e}): pip install pycuda") from e
    return cuda


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, path: Path, *, plugin_library: str | None = None, device: int = 0) -> None:
        self.info: ArtifactInfo = sidecar_info(path, "tensorrt")
        side = self.info.sidecar
        cuda = _import_pycuda()
        trt = _import_trt(side.get("backend", "tensorrt"))
        cuda.init()
        if cuda.Device.count() <= device:
            raise DeployError(f"no CUDA device {device} (pycuda sees {cuda.Device.count()})")
        dev = cuda.Device(device)
        cc = "{}.{}".format(*dev.compute_capability())
        plugins = check_sidecar(side, engine=path, runtime=side.get("backend", "tensorrt"),
                                runtime_version=trt.__version__, compute_capability=cc,
                                plugin_library=plugin_library)  # fmt: skip
        self.ctx = dev.retain_primary_context()
        self.ctx.push()
        try:
            if plugins:
                from sidnet.export.trt_plugins import register_plugins

                register_plugins(plugins["library"])
            self.logger = trt.Logger(trt.Logger.WARNING)
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise DeployError(f"{trt.__name__} {trt.__version__} could not deserialise {path}: rebuild it here")
            self.context = self.engine.create_execution_context()
            self.max_batch = int(self.engine.get_tensor_profile_shape("images", 0)[2][0])
            tensors = []
            for i in range(self.engine.num_io_tensors):
                name = self.engine.get_tensor_name(i)
                tensors.append((name, self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                                str(self.engine.get_tensor_dtype(name)).split(".")[-1],
                                tuple(self.engine.get_tensor_shape(name))))  # fmt: skip
            self.bindings = plan_bindings(tensors, max_batch=self.max_batch)
            self.stream = cuda.Stream()
            self.host = {b.name: cuda.pagelocked_empty(b.shape, b.dtype) for b in self.bindings}
            self.device = {b.name: cuda.mem_alloc(b.nbytes) for b in self.bindings}
            for b in self.bindings:
                self.context.set_tensor_address(b.name, int(self.device[b.name]))
        finally:
            self.ctx.pop()
        self._cuda = cuda

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = images.shape[0]
        if not 1 <= n <= self.max_batch:
            raise DeployError(f"batch {n} is outside the engine's profile (max {self.max_batch}): lower --batch "
                              "or rebuild with a larger batch.max")  # fmt: skip
        cuda = self._cuda
        self.ctx.push()
        try:
            host_in = self.host["images"]
            host_in[:n] = images
            cuda.memcpy_htod_async(self.device["images"], host_in[:n], self.stream)
            self.context.set_input_shape("images", (n, *host_in.shape[1:]))
            if not self.context.execute_async_v3(self.stream.handle):
                raise DeployError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
            for b in self.bindings:
                if not b.is_input:
                    cuda.memcpy_dtoh_async(self.host[b.name][:n], self.device[b.name], self.stream)
            self.stream.synchronize()
        finally:
            self.ctx.pop()
        return self.host["detections"][:n].copy(), self.host["num_detections"][:n].copy()

    def close(self) -> None:
        self.ctx.push()
        try:
            for buf in self.device.values():
                buf.free()
            self.context = self.engine = None
        finally:
            self.ctx.pop()
            self.ctx.detach()

    def __enter__(self) -> TensorRTBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_backend(path: Path, **options) -> TensorRTBackend:
    return TensorRTBackend(Path(path), **options)
