"""What a deployable artifact is, and which backend runs it, decided from the file itself.

| file | backend | description read from |
|---|---|---|
| ``*.engine`` / ``*.plan`` | ``tensorrt`` | the JSON sidecar ``<engine>.json`` written by ``python -m export`` |
| ``*.onnx`` | ``onnxruntime`` | the ONNX metadata (``metadata_props``) |
| ``*.pt`` | ``torch`` | the checkpoint (``sidnet.checkpoint.load_checkpoint``), read by the backend |
| ``*.pt2`` | ``compiled`` | the JSON sidecar ``<package>.json`` written by ``python -m export --backend compiled`` |
| ``triton://host:port/model`` | ``triton`` | the server (``sidnet.runtime.backends.triton``) |

Torch-free: the TensorRT path imports this module without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidnet.runtime.errors import DeployError
from sidnet.safety import UnsafeInputError, check_input_size, load_onnx, parse_json, read_bytes, require_regular

BACKENDS = ("tensorrt", "onnxruntime", "torch", "compiled", "triton")
TRITON_SCHEME = "triton://"
BACKEND_BY_SUFFIX = {".engine": "tensorrt", ".plan": "tensorrt", ".onnx": "onnxruntime", ".pt": "torch",
                     ".pt2": "compiled"}  # fmt: skip
KIND = {"tensorrt": "a TensorRT engine", "onnxruntime": "an ONNX model", "torch": "a PyTorch checkpoint",
        "compiled": "an AOTInductor package", "triton": "a model on a Triton server"}  # fmt: skip
SUFFIX_HINT = {"tensorrt": ".engine", "onnxruntime": ".onnx", "torch": ".pt", "compiled": ".pt2",
               "triton": "triton://host:port/model"}  # fmt: skip
MAX_CLASSES, MAX_TOPK = 1000, 100_000  # bounds on metadata that size the decode buffers
MAX_ANCHOR_PX = 1e5  # anchors size no buffer: only finite and positive matter (a 64² model may keep 416² anchors)


def is_triton_url(artifact: str | Path) -> bool:
    return isinstance(artifact, str) and artifact.startswith(TRITON_SCHEME)


@dataclass
class ArtifactInfo:
    """The detector an artifact holds. ``conf_thresh``/``topk`` are the artifact's own (rows under ``conf_thresh``
    are already dropped by the exported graph, so a runtime threshold must not be lower)."""

    path: Path
    backend: str
    input_size: int
    class_names: list[str]
    anchors: list[list[float]]
    conf_thresh: float
    topk: int
    model: str = "?"
    precision: str = "fp32"
    sidecar: dict[str, Any] = field(default_factory=dict)


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def backend_for(path: str | Path, backend: str | None = None) -> str:
    """The backend that runs ``path``; a ``backend`` that does not fit the file is an error, never a conversion."""
    if is_triton_url(path):
        if backend not in (None, "triton"):
            raise DeployError(f"{path} is {KIND['triton']}: drop --backend {backend}, or pass a file for it")
        return "triton"
    path = Path(path)
    if not path.exists():
        raise DeployError(f"artifact not found: {path}; pass a .engine, .onnx, .pt or .pt2 written by python -m "
                          "train / python -m export")  # fmt: skip
    if path.is_dir():
        raise DeployError(f"artifact {path} is a folder: pass the model file inside it (e.g. {path}/model.onnx)")
    require_regular(path, what="artifact", fix="pass the model file written by python -m export")
    found = BACKEND_BY_SUFFIX.get(path.suffix.lower())
    if found is None:
        raise DeployError(f"artifact {path}: unknown suffix {path.suffix!r}; use .engine (tensorrt), .onnx "
                          "(onnxruntime), .pt (torch) or .pt2 (compiled)")  # fmt: skip
    if backend == "torch" and found == "onnxruntime":  # an INT8 Q/DQ export on the INT8 tensor cores
        return "torch"
    if backend is not None and backend != found:
        if backend not in BACKENDS:
            raise DeployError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
        raise DeployError(f"artifact {path} is {KIND[found]}, which runs on backend {found}, not {backend}: drop "
                          f"--backend, or pass a {SUFFIX_HINT[backend]} file for {backend}")  # fmt: skip
    return found


def read_sidecar(path: Path) -> dict[str, Any]:
    side = sidecar_path(path)
    if not side.exists():
        raise DeployError(f"{path} has no sidecar {side.name}: the runtime checks it before loading; re-export "
                          "with python -m export, which writes both")  # fmt: skip
    fix = "re-export with python -m export"
    data = parse_json(read_bytes(side, kind="json", what="sidecar", fix=fix), what=f"sidecar {side}", fix=fix)
    if not isinstance(data, dict):
        raise DeployError(f"sidecar {side} is not a JSON object; re-export with python -m export")
    return data


def info_from_fields(path: Path, backend: str, d: dict[str, Any], source: str, **extra: Any) -> ArtifactInfo:
    """ArtifactInfo from the exported metadata fields (ONNX metadata, a sidecar, a Triton model's sidnet_info)."""
    fix = "re-export with python -m export"
    try:
        size = check_input_size(d["input_size"], where=f"{source} of {path}", fix=fix)  # before any buffer exists
        names = [str(n) for n in (d.get("class_names") or [])]
        anchors = [list(map(float, a)) for a in d["anchors"] or []]  # Mask R-CNN: null (its anchors are inside)
        num_classes = int(d.get("num_classes", len(names) or 1))  # older sidecars: no names = the one person class
        conf, topk = float(d["conf_thresh"]), int(d["topk"])
    except (KeyError, TypeError) as e:
        raise DeployError(f"{path}: {source} lacks or garbles {e}; {fix}") from e
    bad = [a for a in anchors if len(a) != 2 or not all(math.isfinite(v) and 0 < v <= MAX_ANCHOR_PX for v in a)]
    no_anchors = d["anchors"] is not None and not anchors  # null only for Mask R-CNN (its anchors are inside)
    if no_anchors or bad or not 1 <= num_classes <= MAX_CLASSES or not 1 <= topk <= MAX_TOPK:
        raise DeployError(f"{path}: {source} has anchors {(bad or anchors)[:2]}, num_classes {num_classes}, topk "
                          f"{topk}; they must be positive [w, h] pairs, 1..{MAX_CLASSES} classes, topk 1..{MAX_TOPK}; "
                          f"{fix}")  # fmt: skip
    if not (math.isfinite(conf) and 0 <= conf < 1) or (names and len(names) != num_classes):
        raise DeployError(f"{path}: {source} has conf_thresh {conf} and {len(names)} class names for {num_classes} "
                          f"classes; {fix}")  # fmt: skip
    names = names or (["person"] if num_classes == 1 else [f"class{i}" for i in range(num_classes)])
    return ArtifactInfo(path=path, backend=backend, input_size=size, class_names=names, anchors=anchors,
                        conf_thresh=conf, topk=topk, model=str(d.get("model", "?")),
                        precision=str(d.get("precision", "fp32")), **extra)  # fmt: skip


def onnx_info(path: Path) -> ArtifactInfo:
    model = load_onnx(path)
    meta = {p.key: p.value for p in model.metadata_props}
    fields = {}
    for key, value in meta.items():
        try:
            fields[key] = parse_json(value, what=f"{path} metadata {key!r}", fix="re-export with python -m export")
        except UnsafeInputError:
            if value.lstrip()[:1] in ("[", "{"):  # meant as JSON, but garbled or nested too deep
                raise
            fields[key] = value
    if "input_size" not in fields:
        raise DeployError(f"{path} has no SIDNet metadata (input_size, anchors, ...): export it with python -m export")
    return info_from_fields(path, "onnxruntime", fields, "ONNX metadata")


def sidecar_info(path: Path, backend: str) -> ArtifactInfo:
    side = read_sidecar(path)
    return info_from_fields(path, backend, side, f"sidecar {sidecar_path(path).name}", sidecar=side)


def inspect_artifact(path: str | Path, backend: str | None = None) -> ArtifactInfo | None:
    """ArtifactInfo for ONNX / engine / compiled package; ``None`` for a checkpoint (the torch backend reads it)."""
    path = Path(path)
    backend = backend_for(path, backend)
    if backend == "onnxruntime":
        return onnx_info(path)
    if backend in ("tensorrt", "compiled"):
        return sidecar_info(path, backend)
    return None
