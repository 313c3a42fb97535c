"""Finding and opening ``libsidnet_kernels.so`` (``csrc/``), its C signatures and error codes; the launch helpers
the bindings in :mod:`sidnet.kernels.ops` share. Imports neither torch nor the library at import time."""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LIB_ENV = "SIDNET_KERNELS_LIB"
LIB_NAME = "libsidnet_kernels.so"
ABI_VERSION = 1  # csrc/common/sidnetCommon.h: SIDNET_KERNELS_ABI_VERSION
REGION_TOPK_MAX_K = 4096  # csrc/region/regionKernel.h: min(topk, A*H*W) must not exceed it
_REPO_LIB = Path(__file__).resolve().parents[2] / "build" / "kernels" / LIB_NAME
_BUILD_HINT = "build it with `python -m sidnet.kernels.build` in the repository root (needs nvcc)"

_loaded: dict[str, ctypes.CDLL] = {}  # resolved path → library
_default: dict[str, ctypes.CDLL] = {}  # $SIDNET_KERNELS_LIB value → library the wrappers use


def library_path(path: str | os.PathLike | None = None) -> Path:
    """The library file :func:`load_library` would open; FileNotFoundError naming the fix if there is none."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist: {_BUILD_HINT}, or pass the path of a built {LIB_NAME}")
        return p
    env = os.environ.get(LIB_ENV)
    if env:
        p = Path(env)
        if not p.is_file():
            raise FileNotFoundError(f"{LIB_ENV}={env} does not exist: point it at a built {LIB_NAME} or unset it")
        return p
    if _REPO_LIB.is_file():
        return _REPO_LIB
    raise FileNotFoundError(f"{LIB_NAME} not found ({LIB_ENV} unset, no {_REPO_LIB}): {_BUILD_HINT}, or set {LIB_ENV}")


def load_library(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    """Open (once per file) the kernels library and declare its C signatures."""
    p = str(library_path(path).resolve())
    lib = _loaded.get(p)
    if lib is not None:
        return lib
    lib = ctypes.CDLL(p)
    vp, i, f, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_size_t
    lib.sidnetKernelsAbiVersion.argtypes, lib.sidnetKernelsAbiVersion.restype = [], i
    lib.sidnetGetErrorString.argtypes, lib.sidnetGetErrorString.restype = [i], ctypes.c_char_p
    lib.reorgForward.argtypes = [vp, vp, i, i, i, i, i, i, vp]
    lib.regionDecode.argtypes = [vp, i, vp, i, i, i, i, i, f, f, vp, vp]
    lib.regionTopKWorkspaceSize.argtypes, lib.regionTopKWorkspaceSize.restype = [i, i, i, i, i], sz
    lib.regionTopK.argtypes = [vp, i, vp, i, i, i, i, i, f, f, f, i, vp, vp, vp, sz, vp]
    lib.pyramidRoiAlign.argtypes = [vp, i, vp, vp, vp, i, i, i, vp, i, i, i, i, i, f, f, vp, vp]
    for name in ("reorgForward", "regionDecode", "regionTopK", "pyramidRoiAlign"):
        getattr(lib, name).restype = i
    version = lib.sidnetKernelsAbiVersion()
    if version != ABI_VERSION:
        raise RuntimeError(f"{p} has ABI version {version}, this binding needs {ABI_VERSION}: {_BUILD_HINT}")
    _loaded[p] = lib
    return lib


def _lib() -> ctypes.CDLL:
    key = os.environ.get(LIB_ENV, "")
    lib = _default.get(key)
    if lib is None:
        lib = _default[key] = load_library()
    return lib


def _check(lib: ctypes.CDLL, err: int, what: str) -> None:
    if err != 0:
        msg = lib.sidnetGetErrorString(err).decode()
        raise RuntimeError(f"{what} failed: {msg} (cudaError_t {err})")


def _dtype_code(t: torch.Tensor, name: str) -> int:
    import torch

    if not t.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor, got device {t.device}")
    if t.dtype == torch.float32:
        return 0
    if t.dtype == torch.float16:
        return 1
    raise ValueError(f"{name} must be float32 or float16, got {t.dtype}")


def _stream(t: torch.Tensor) -> int:
    """Raw cudaStream_t of the current stream on t's device (inside CUDA-graph capture: the capturing stream)."""
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what torch.compile's kernels use; no Stream object
    if raw is not None:
        return raw(t.device.index)
    return torch.cuda.current_stream(t.device).cuda_stream


def _on_device(t: torch.Tensor):
    """Make t's device current for the launch (a no-op context in the usual single-GPU case)."""
    import torch

    if t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def _out_tensor(out: torch.Tensor | None, shape: tuple, dtype, like: torch.Tensor, name: str) -> torch.Tensor:
    """``out`` checked (contiguous, ``shape``, ``dtype``, on ``like``'s device), or a new such tensor when None."""
    if out is None:
        import torch

        return torch.empty(shape, dtype=dtype, device=like.device)
    _check_out(out, shape, dtype, like, name)
    return out


def _check_out(out: torch.Tensor, shape: tuple, dtype, like: torch.Tensor, name: str) -> None:
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != like.device or not out.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on {like.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )


def _late_symbol(lib: ctypes.CDLL, symbol: str, argtypes: list) -> ctypes._CFuncPtr:
    """A launcher added after ABI 1 (looked up on use, so an older library still serves the others)."""
    fn = getattr(lib, symbol, None)
    if fn is None:
        raise RuntimeError(f"the kernels library predates {symbol}: {_BUILD_HINT}")
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn
