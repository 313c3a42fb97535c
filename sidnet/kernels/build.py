"""Build ``libsidnet_kernels.so`` from ``csrc/*/*.cu`` with nvcc.

Usage (from a source checkout): ``python -m sidnet.kernels.build [--out DIR] [--arch 90 ...] [--resource-usage]``.
The library is optional: training and ONNX export never need it, and ``pip install`` never builds it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CSRC = REPO_ROOT / "csrc"
DEFAULT_OUT = REPO_ROOT / "build" / "kernels"
LIB_NAME = "libsidnet_kernels.so"
# Ampere (A100, A10/30xx), Ada (L4/40xx), Hopper; compute_90 PTX lets newer GPUs JIT-compile the Hopper code.
DEFAULT_ARCHS = ("80", "86", "89", "90")
CUDA_HOME_DEFAULTS = ("/usr/local/cuda",)
NVCC_MISSING = "nvcc not found: install the CUDA toolkit or set CUDACXX; the kernels are optional for training"


class BuildError(RuntimeError):
    """nvcc is missing or failed; the message is one line a user can act on."""


def find_nvcc() -> str:
    """nvcc from $CUDACXX, then PATH, then $CUDA_HOME/bin, $CUDA_PATH/bin and /usr/local/cuda/bin."""
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), *CUDA_HOME_DEFAULTS):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    for cand in candidates:
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    raise BuildError(NVCC_MISSING)


def sources(csrc: Path = CSRC) -> list[Path]:
    found = sorted(csrc.glob("*/*.cu"))
    if not found:
        raise BuildError(f"no CUDA sources under {csrc}: build from a source checkout of SIDNet")
    return found


def gencode_flags(archs: tuple[str, ...] | list[str]) -> list[str]:
    """SASS for every arch, plus PTX of the newest so that later GPUs can still load the library."""
    archs = sorted({a.removeprefix("sm_").removeprefix("compute_") for a in archs}, key=int)
    flags = []
    for a in archs[:-1]:
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=[sm_{archs[-1]},compute_{archs[-1]}]")
    return flags


def nvcc_command(nvcc: str, out_file: Path, archs=DEFAULT_ARCHS, resource_usage: bool = False) -> list[str]:
    cmd = [nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-shared", "-lineinfo", "--threads", "0"]
    cmd += gencode_flags(archs)
    if resource_usage:
        cmd.append("--resource-usage")
    cmd += [str(p) for p in sources()]
    cmd += ["-o", str(out_file)]
    return cmd


def build(
    out_dir: str | os.PathLike | None = None,
    *,
    archs=DEFAULT_ARCHS,
    resource_usage: bool = False,
    verbose: bool = True,
) -> Path:
    """Compile all kernels into ``out_dir/libsidnet_kernels.so`` and return its path.

    With ``resource_usage`` the ptxas report (registers, shared memory, spills per kernel and arch) is written to
    ``out_dir/resource-usage.txt``. Raises BuildError when nvcc is missing or fails.
    """
    nvcc = find_nvcc()
    out = Path(out_dir) if out_dir is not None else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    target = out / LIB_NAME
    tmp = out / f".{LIB_NAME}.{os.getpid()}.tmp"  # renamed into place: a process that has the old one loaded keeps it
    cmd = nvcc_command(nvcc, tmp, archs, resource_usage)
    if verbose:
        print(shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        sys.stderr.write(proc.stdout + proc.stderr)
        raise BuildError(f"nvcc failed with exit code {proc.returncode} (its output is above)")
    if resource_usage:
        (out / "resource-usage.txt").write_text(proc.stdout + proc.stderr)
    elif verbose and (proc.stdout or proc.stderr):
        sys.stderr.write(proc.stdout + proc.stderr)
    os.replace(tmp, target)
    if verbose:
        print(f"built {target}", flush=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidnet.kernels.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument(
        "--arch",
        action="append",
        default=None,
        help="compute capability to build for, e.g. 90 (repeatable; default: " + " ".join(DEFAULT_ARCHS) + ")",
    )
    parser.add_argument(
        "--resource-usage", action="store_true", help="write ptxas' per-kernel report to OUT/resource-usage.txt"
    )
    args = parser.parse_args(argv)
    try:
        build(args.out, archs=tuple(args.arch or DEFAULT_ARCHS), resource_usage=args.resource_usage)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
