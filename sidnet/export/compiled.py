"""``python -m export --backend compiled``: the network compiled ahead of time into an AOTInductor package.

``torch.export`` traces the BatchNorm-folded network plus its top-K decode (:class:`~sidnet.graph.wrapper.DeployModel`
contract: ``images`` → ``detections``, ``num_detections``) with a dynamic batch axis, and
``torch._inductor.aoti_compile_and_package`` compiles it to ``model.pt2`` (generated C++/Triton kernels in a zip). A
GPU without TensorRT then loads it in seconds (``torch._inductor.aoti_load_package``) instead of spending minutes in
``torch.compile``. The package is specific to the torch version and the device kind (and GPU architecture) it was
compiled on: the sidecar ``model.pt2.json`` records them and the ``compiled`` runtime backend checks them first.

The fused ``csrc/`` region kernel is a ctypes call and cannot live inside a package: here the decode tail is
Inductor's own code generated from :class:`~sidnet.graph.wrapper.TopKDecode`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from sidnet.graph.errors import ExportError
from sidnet.graph.wrapper import INPUT_NAME, DeployModel
from sidnet.io import sha256_file
from sidnet.models.fuse import fuse_for_inference

log = logging.getLogger("sidnet.export")
MODES = ("default", "max-autotune")


def compiled_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError("compiled_device=cuda but torch sees no CUDA GPU: compile on the GPU that will run it")
    if device not in ("cuda", "cpu"):
        raise ExportError(f"compiled_device={device!r}: use cuda, cpu or auto")
    return torch.device(device)


def export_compiled(
    model: torch.nn.Module,
    out_dir: Path,
    *,
    precision: str,
    conf_thresh: float,
    topk: int,
    max_batch: int,
    meta: dict,
    device: str | None = None,
    mode: str = "default",
) -> tuple[Path, dict]:
    """Compile ``model`` (a YOLOv2) into ``out_dir/model.pt2`` + ``model.pt2.json``; returns (package, sidecar).

    Input of the package: ``images`` (N, 3, S, S) in the package's dtype (fp16 or fp32), contiguous NCHW, [0, 1],
    letterboxed; 1 <= N <= ``max_batch``. ``mode``: ``default`` or ``max-autotune`` (minutes longer, tuned kernels).
    """
    if mode not in MODES:
        raise ExportError(f"compiled_mode={mode!r}: use {' or '.join(MODES)}")
    dev = compiled_device(device)
    if precision == "fp16" and dev.type == "cpu":
        raise ExportError("--precision fp16 with --backend compiled needs a CUDA GPU (CPU convs have no fast FP16): "
                          "use fp32 on a CPU")  # fmt: skip
    dtype = torch.float16 if precision == "fp16" else torch.float32
    net = fuse_for_inference(model).to(dev, dtype)
    deploy = DeployModel(net, conf_thresh=conf_thresh, topk=topk).to(dev).eval()
    size = model.input_size
    example = torch.rand(2, 3, size, size, device=dev, dtype=dtype)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    start = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(deploy, (example,), dynamic_shapes={"images": {0: batch}})
        configs = {"max_autotune": True} if mode == "max-autotune" else {}
        out_dir.mkdir(parents=True, exist_ok=True)
        path = Path(torch._inductor.aoti_compile_and_package(program, package_path=str(out_dir / "model.pt2"),
                                                             inductor_configs=configs))  # fmt: skip
    seconds = time.perf_counter() - start
    gpu = cc = None
    if dev.type == "cuda":
        gpu, cc = torch.cuda.get_device_name(dev), "{}.{}".format(*torch.cuda.get_device_capability(dev))
    sidecar = {
        "backend": "compiled",
        "package": path.name,
        "package_sha256": sha256_file(path),
        "torch": torch.__version__,
        "device": dev.type,
        "gpu": gpu,
        "compute_capability": cc,
        "precision": precision,
        "mode": mode,
        "input": {"name": INPUT_NAME, "dtype": str(dtype).split(".")[-1], "layout": "NCHW contiguous",
                  "batch": {"min": 1, "max": max_batch}},  # fmt: skip
        "decode": "TopKDecode compiled by Inductor (no csrc kernel inside a package)",
        "conf_thresh": conf_thresh,
        "topk": topk,
        "compile_seconds": round(seconds, 1),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        **{k: meta[k] for k in ("model", "weights", "anchors", "num_classes", "class_names", "input_size",
                                "sidnet_version", "preprocessing", "outputs") if k in meta},
    }  # fmt: skip
    (out_dir / "model.pt2.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    log.info("compiled: %s (%s, %s, %s) in %.0f s", path, dev.type, precision, mode, seconds)
    return path, sidecar
