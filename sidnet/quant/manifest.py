"""Provenance manifest of an INT8 export (``int8_manifest.json`` beside ``model.onnx``) and the checks that use it.

An INT8 artifact is only right for the FP32 graph and the preprocessing it was calibrated with. The manifest
records: the FP32 graph's hash, the preprocessing (text + input size), the calibration image-list hash, method,
batches, the hashes of the Q/DQ ONNX and the calibration cache, the layers kept out of INT8, package versions.
:func:`check_artifact` (engine builds, ``python -m train.evaluate --onnx``) and :func:`check_cache` (a cache meant
for an FP32 model) refuse a stale combination with one line naming what differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx

from sidnet.io import sha256_file
from sidnet.quant.calibration import CalibrationError
from sidnet.safety import contained_file, load_onnx, parse_json, read_bytes

MANIFEST_NAME = "int8_manifest.json"
FORMAT = "sidnet-int8-manifest"


def graph_sha256(model: onnx.ModelProto) -> str:
    """Hash of the graph alone (nodes, weights, I/O): model-level metadata and producer fields do not count."""
    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()


def is_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST_NAME
    path.write_text(json.dumps({"format": FORMAT, "version": 1, **manifest}, indent=2, default=str) + "\n")
    return path


def read_manifest(path: Path) -> dict:
    fix = "export again with python -m export --precision int8 --force"
    try:  # a FIFO, a folder, an oversized or garbled file: the safety readers' own one-line errors
        data = parse_json(read_bytes(path, kind="json", what="INT8 manifest", fix=fix), what=f"INT8 manifest {path}",
                          fix=fix)  # fmt: skip
    except OSError as e:
        raise CalibrationError(f"INT8 manifest {path} cannot be read ({e.strerror or e}); {fix}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CalibrationError(f"{path} is not a SIDNet INT8 manifest (format {FORMAT!r}); export again")
    return data


def manifest_entry(m: dict, path: Path, *keys: str):
    """``m[k1][k2]...``, or a one-line error naming the manifest and the missing key."""
    node = m
    for i, k in enumerate(keys):
        if not isinstance(node, dict) or k not in node:
            raise CalibrationError(f"INT8 manifest {path} lacks {'.'.join(keys[: i + 1])}: it is damaged or hand-"
                                   "edited; re-export with python -m export --precision int8 --force")  # fmt: skip
        node = node[k]
    return node


def _differs(what: str, recorded, now, fix: str) -> CalibrationError:
    return CalibrationError(f"stale INT8 artifact: {what} differs (manifest {recorded}, now {now}); {fix}")


def check_artifact(onnx_path: str | Path) -> dict | None:
    """For a Q/DQ ONNX: its manifest must exist and match the file, its FP32 source graph (when beside it) and the
    preprocessing in its metadata. Returns the manifest (None for a model without Q/DQ nodes)."""
    onnx_path = Path(onnx_path)
    model = load_onnx(onnx_path)
    if not is_qdq(model):
        return None
    path = onnx_path.parent / MANIFEST_NAME
    if not path.exists():  # present but not a regular file: read_manifest says so
        raise CalibrationError(
            f"{onnx_path} is an INT8 Q/DQ model without its {MANIFEST_NAME}: its provenance is unknown; "
            "export it again with python -m export --precision int8"
        )
    m = read_manifest(path)
    fix = "re-export with python -m export --precision int8 --force"
    entry = lambda *keys: manifest_entry(m, path, *keys)  # noqa: E731

    def named(key: str) -> Path:  # lies in the manifest's own folder and is a regular file: never followed out
        return contained_file(onnx_path.parent, entry(key, "file"), what=f"INT8 manifest {path} ({key})", fix=fix)

    if named("qdq_onnx").resolve() == onnx_path.resolve() and entry("qdq_onnx", "sha256") != (
            now := sha256_file(onnx_path)):  # fmt: skip
        raise _differs(f"{onnx_path.name} sha256", entry("qdq_onnx", "sha256")[:12], now[:12], fix)
    meta = {p.key: p.value for p in model.metadata_props}
    check_preprocessing(m, preprocessing=meta.get("preprocessing"), input_size=meta.get("input_size"), fix=fix)
    fp32 = named("fp32_onnx")
    if (now := graph_sha256(load_onnx(fp32))) != entry("fp32_onnx", "graph_sha256"):
        raise _differs(f"FP32 source graph {fp32.name}", entry("fp32_onnx", "graph_sha256")[:12], now[:12], fix)
    cache = named("cache")
    if (now := sha256_file(cache)) != entry("cache", "sha256"):
        raise _differs(f"calibration cache {cache.name} sha256", entry("cache", "sha256")[:12], now[:12], fix)
    return m


def check_preprocessing(m: dict, *, preprocessing: str | None, input_size, fix: str) -> None:
    rec = m.get("preprocessing")
    if not isinstance(rec, dict) or not {"input_size", "text"} <= set(rec):
        raise CalibrationError(f"INT8 manifest lacks preprocessing.input_size/text: damaged or hand-edited; {fix}")
    if input_size is not None and str(input_size) != str(rec["input_size"]):
        raise _differs("input size", rec["input_size"], input_size, fix)
    if preprocessing is not None and preprocessing != rec["text"]:
        raise _differs("preprocessing", repr(rec["text"][:40] + "..."), repr(preprocessing[:40] + "..."), fix)


def check_cache(cache_path: str | Path, fp32_model: onnx.ModelProto) -> dict:
    """A calibration cache is usable with ``fp32_model`` only if its manifest names that very graph and input size."""
    cache_path = Path(cache_path)
    path = cache_path.parent / MANIFEST_NAME
    if not path.is_file():
        raise CalibrationError(f"calibration cache {cache_path} has no {MANIFEST_NAME} beside it: provenance unknown")
    m = read_manifest(path)
    now = graph_sha256(fp32_model)
    if now != m["fp32_onnx"]["graph_sha256"]:
        raise CalibrationError(
            f"calibration cache {cache_path} is from another model: FP32 graph {m['fp32_onnx']['graph_sha256'][:12]} "
            f"in its manifest, this model is {now[:12]}; recalibrate for this model"
        )
    meta = {p.key: p.value for p in fp32_model.metadata_props}
    check_preprocessing(m, preprocessing=meta.get("preprocessing"), input_size=meta.get("input_size"),
                        fix="recalibrate for this model")  # fmt: skip
    return m
