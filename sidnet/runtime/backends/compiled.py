"""``compiled`` backend: an AOTInductor package (``python -m export --backend compiled``) loaded in seconds, run
through the same CUDA-graph / GPU-letterbox machinery as the ``torch`` backend (:class:`GraphRunner`).

Loading needs ``onnxruntime`` imported first (measured, torch 2.11 on the H100, ``benchmarks/compiled_isolate.py`` →
``benchmarks/results/deploy/compiled_isolate_h100.md``): in a process that has not imported it,
``AOTIModelPackageLoader`` segfaults on every package we tried (full SIDNet at 416², a narrow one at 128²), while
importing ``cv2``, loading the ``csrc`` library or warming cuBLAS/cuDNN first does not help. The root cause (most likely
a shared library the package's ``.so`` resolves from whatever the process already loaded) was not found;
``onnxruntime`` is a core dependency, so the backend imports it before loading.

The AOTInductor runner cannot be captured in a CUDA graph (torch 2.11 on the H100: "operation not permitted when
stream is capturing"), so it runs uncaptured: its C++ wrapper launches the kernels with little host overhead.
The sidecar is checked before loading: torch version (AOTInductor packages are not portable across releases),
device kind and GPU compute capability, and the package's SHA-256.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sidnet.io import sha256_file
from sidnet.runtime.artifact import sidecar_info
from sidnet.runtime.backends.torch import GraphRunner
from sidnet.runtime.errors import DeployError


def check_compiled_sidecar(side: dict, *, package: Path) -> torch.device:
    if side.get("backend") != "compiled":
        raise DeployError(f"{package}: sidecar backend {side.get('backend')!r} is not `compiled`; re-export with "
                          "python -m export --backend compiled")  # fmt: skip
    if side.get("torch") != torch.__version__:
        raise DeployError(f"{package} was compiled with torch {side.get('torch')}, this is torch {torch.__version__}: "
                          "AOTInductor packages only load in the release that built them; re-export here")  # fmt: skip
    dev = torch.device(side.get("device", "cpu"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeployError(f"{package} was compiled for CUDA ({side.get('gpu')}) and torch sees no GPU here")
        cc = "{}.{}".format(*torch.cuda.get_device_capability())
        if side.get("compute_capability") != cc:
            raise DeployError(f"{package} was compiled for compute capability {side.get('compute_capability')}, "
                              f"this GPU is {cc}: re-export on this GPU")  # fmt: skip
    digest = side.get("package_sha256")
    if digest and sha256_file(package) != digest:
        raise DeployError(f"{package} does not match its sidecar's package_sha256: re-export, or restore the pair")
    return dev


class CompiledBackend(GraphRunner):
    name = "compiled"

    def __init__(self, path: Path, *, graphs: bool = False) -> None:
        info = sidecar_info(path, "compiled")
        dev = check_compiled_sidecar(info.sidecar, package=path)
        import onnxruntime  # noqa: F401  -- must precede the load (module docstring)

        runner = torch._inductor.aoti_load_package(str(path))
        dtype = torch.float16 if info.sidecar.get("input", {}).get("dtype") == "float16" else torch.float32

        def forward(x):
            dets, num = runner(x)
            return dets, num

        max_batch = int(info.sidecar.get("input", {}).get("batch", {}).get("max", 0)) or None
        super().__init__(forward, info=info, device=dev, dtype=dtype, channels_last=False, graphs=graphs,
                         max_batch=max_batch)  # fmt: skip


def open_backend(path: Path, **options) -> CompiledBackend:
    return CompiledBackend(Path(path), **options)
