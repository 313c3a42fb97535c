"""``--precision int8``: the FP32 native graph → calibration → Q/DQ ONNX + TensorRT calibration cache → accuracy gate
→ provenance manifest. Called by :func:`sidnet.export.pipeline.run_export`; plain arguments only.

Files written in the export folder (none overwritten without ``force``): ``model_fp32.onnx`` (the calibrated FP32
graph, the implicit-INT8 input), ``model.onnx`` (Q/DQ), ``calibration.cache`` (TensorRT text format, names = the FP32
graph's tensor names, which TensorRT's ONNX parser keeps), ``int8_manifest.json``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from sidnet.graph.errors import ExportError
from sidnet.io import sha256_file
from sidnet.quant import calibration as calib
from sidnet.quant import qdq as q
from sidnet.quant.manifest import MANIFEST_NAME, graph_sha256, write_manifest

log = logging.getLogger("sidnet.quant.qdq")

FILES = ("model.onnx", "model_fp32.onnx", "calibration.cache", MANIFEST_NAME)
CACHE_TRT_VERSION = "100100"  # the header TensorRT 10.x writes (major*10000 + minor*100 + patch)


@dataclass
class Int8Result:
    qdq: onnx.ModelProto
    manifest: dict
    cache: Path
    fp32_path: Path


def refuse_overwrite(out_dir: Path, *, force: bool) -> None:
    existing = [f for f in FILES if (out_dir / f).exists()]
    if existing and not force:
        raise ExportError(
            f"{out_dir} already holds {', '.join(existing)}: pass --force to overwrite, or --out elsewhere"
        )


def quantize_export(
    fp32: onnx.ModelProto,
    int8,
    out_dir: Path,
    *,
    size: int,
    project_root: Path,
    force: bool,
    qat_amax: dict | None,
    qat: dict | None = None,
) -> Int8Result:
    """``qat_amax`` (``{ONNX tensor: amax}``, from a QAT checkpoint whose record is ``qat``): those ranges, no
    calibration; a calibration set, when given, then only feeds modelopt's placement pass and the gate's default."""
    refuse_overwrite(out_dir, force=force)
    if qat_amax is not None and not (int8.images or int8.data):
        cset, source = None, None
    else:
        cset, source = calib.calibration_set(images=int8.images, data=int8.data, split=int8.split, size=size,
                                             batches=int8.batches, batch_size=int8.batch_size,
                                             project_root=project_root)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="sidnet-int8-") as tmp:  # nothing lands in out_dir unless all succeeds
        result = _quantize(fp32, int8, Path(tmp), cset, source, size=size, project_root=project_root,
                           qat_amax=qat_amax, qat=qat)  # fmt: skip
        for path in (result.fp32_path, result.cache):
            shutil.move(str(path), out_dir / path.name)
        result.fp32_path, result.cache = out_dir / result.fp32_path.name, out_dir / result.cache.name
    return result


def _quantize(fp32, int8, work: Path, cset, source, *, size: int, project_root: Path, qat_amax, qat) -> Int8Result:
    fp32_path = work / "model_fp32.onnx"
    onnx.save(fp32, str(fp32_path))
    exclude = [*q.head_and_decode_nodes(fp32), *int8.exclude]
    if cset is not None:
        first = next(iter(calib.CalibrationSet(cset.paths[: cset.batch_size], size=size, batch_size=cset.batch_size)))
    else:  # modelopt's own ranges from this batch are replaced by the QAT ones (check_cache_applied)
        first = np.random.default_rng(0).random((int8.batch_size, 3, size, size), dtype=np.float32)
    probe = q.quantize_with_modelopt(fp32_path, batch=first, exclude=exclude, high_precision=int8.high_precision)
    tensors = list(q.activation_scales(probe))
    if qat_amax is not None:
        missing = [t for t in tensors if t not in qat_amax]
        if missing:
            raise ExportError(f"the QAT checkpoint has no activation range for {len(missing)} tensor(s) "
                              f"(first: {missing[0]}): fine-tune again with this sidnet version")  # fmt: skip
        amax, method = {t: qat_amax[t] for t in tensors}, "qat"
        log.info("int8: %d activation ranges from the QAT checkpoint (no calibration)", len(amax))
    else:
        log.info("int8: calibrating %d activation tensors on %d batch(es) of %d from %s, method %s",
                 len(tensors), cset.num_batches, cset.batch_size, source, int8.method)  # fmt: skip
        stats = calib.collect_statistics(fp32.SerializeToString(), tensors, cset)
        amax, method = calib.activation_amax(stats, method=int8.method, percentile=int8.percentile), int8.method
    scales = {t: max(a, 1e-8) / 127.0 for t, a in amax.items()}
    cache = work / "calibration.cache"
    cache.write_text(calib.cache_text(scales, method="entropy" if method == "qat" else method,
                                      trt_version=CACHE_TRT_VERSION))  # fmt: skip

    def requantize(extra: list[str]) -> onnx.ModelProto:
        model = q.quantize_with_modelopt(fp32_path, batch=first, exclude=[*exclude, *extra], cache=cache,
                                         high_precision=int8.high_precision)  # fmt: skip
        q.check_cache_applied(model, scales)
        return model

    qdq = requantize([])
    layers = q.quantized_layers(qdq)
    gate = _gate(fp32, qdq, requantize, layers, int8, cset, size=size, project_root=project_root)
    if gate is not None:
        qdq, gate_record = gate
    else:
        gate_record = {"passed": None, "note": "not run: no held-out labelled split (int8.gate_data, or --calib-data)"}
    manifest = {
        "fp32_onnx": {"file": fp32_path.name, "graph_sha256": graph_sha256(fp32)},
        "preprocessing": {"text": _meta(fp32, "preprocessing"), "input_size": size},
        "calibration": _calibration_record(int8, cset, source, method) if qat_amax is None else {
            "source": "QAT checkpoint activation ranges (no calibration)", "method": "qat", "batches": 0,
            "images": 0, "image_list_sha256": None, "qat": _qat_record(qat),
        },  # fmt: skip
        "quantized_layers": q.quantized_layers(qdq),
        "kept_out_of_int8": {"head_and_decode": exclude[: len(exclude) - len(int8.exclude)],
                             "by_request": list(int8.exclude), "by_accuracy_gate": gate_record.get("kept_out", [])},
        "high_precision": int8.high_precision,
        "accuracy_gate": gate_record,
        "cache": {"file": cache.name, "sha256": sha256_file(cache), "tensors": len(scales)},
        "versions": _versions(),
    }  # fmt: skip
    return Int8Result(qdq, manifest, cache, fp32_path)


def _calibration_record(int8, cset, source: str, method: str) -> dict:
    return {"source": source, "method": method, "percentile": int8.percentile if method == "percentile" else None,
            "batches": cset.num_batches, "batch_size": cset.batch_size, "images": len(cset.used),
            "image_list_sha256": cset.digest()}  # fmt: skip


def _qat_record(qat: dict | None) -> dict | None:
    """What the manifest says of the QAT checkpoint: where its ranges came from (its own calibration), not the
    ranges themselves (they are the cache's)."""
    if qat is None:
        return None
    keep = ("checkpoint", "epoch", "method", "percentile", "calibration", "init_from", "weights", "modelopt")
    return {k: qat.get(k) for k in keep}


def finish_manifest(out_dir: Path, manifest: dict, qdq_path: Path) -> Path:
    manifest["qdq_onnx"] = {"file": qdq_path.name, "sha256": sha256_file(qdq_path)}
    return write_manifest(out_dir, manifest)


def _meta(model: onnx.ModelProto, key: str) -> str | None:
    return next((p.value for p in model.metadata_props if p.key == key), None)


def _gate(fp32, qdq, requantize, layers, int8, cset, *, size: int, project_root: Path):
    from sidnet.quant.accuracy_gate import fallback_loop

    data = int8.gate_data or int8.data
    if not data:
        log.warning("int8: accuracy gate not run (no held-out labelled split: pass int8.gate_data=conf/data/X.yaml)")
        return None
    records = calib.split_records(data, int8.gate_split, project_root=project_root)
    used = {Path(p).resolve() for p in (cset.used if cset is not None else [])}
    overlap = [r.path for r in records if Path(r.path).resolve() in used]
    if overlap:
        raise calib.CalibrationError(
            f"held-out split {data}:{int8.gate_split} shares {len(overlap)} image(s) with the calibration set "
            f"(e.g. {overlap[0]}): calibrate on another split or folder"
        )
    images = np.stack([calib.preprocess(Path(r.path), size) for r in records[: int8.batch_size]])
    return fallback_loop(fp32=fp32, qdq=qdq, requantize=requantize, layers=layers, records=records, images=images,
                         budget=int8.budget, max_fallback=int8.max_fallback)  # fmt: skip


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("nvidia-modelopt", "onnx", "onnxruntime", "torch", "sidnet"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out
