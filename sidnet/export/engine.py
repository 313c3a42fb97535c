"""ONNX → TensorRT / TensorRT-RTX engine, with a JSON sidecar and a layer report.

Both backends get the same path (``tensorrt_rtx`` exposes TensorRT's Python API): a strongly typed network, so the
precision is the ONNX's own (FP16 = the FP16 ONNX from :func:`sidnet.graph.surgery.to_fp16`; TensorRT-RTX has no
FP16 builder flag, and TensorRT deprecated weak typing in 10.12), one optimisation profile over the batch axis, a
timing cache file (full TensorRT; TensorRT-RTX ignores timing caches since 1.2, so none is written for it).

The layer report compares the ONNX node count with the parsed network's layer count and, when the engine can be
deserialised here, the built engine's layer count from ``IEngineInspector``. TensorRT-RTX compiles on the CPU but
cannot deserialise without a supported GPU (not the H100, not a CPU machine): the report then says so.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import onnx

from sidnet.graph.errors import BackendUnavailable, EngineBuildError
from sidnet.graph.wrapper import INPUT_NAME
from sidnet.io import sha256_file

log = logging.getLogger("sidnet.export.engine")

BACKEND_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL_HINTS = {
    "tensorrt": "pip install tensorrt-cu12 (needs NVIDIA's index; not installable on the project's machines)",
    "tensorrt-rtx": "pip install 'sidnet[tensorrt-rtx]' (tensorrt-rtx-cu13==1.7.1.116)",
}
PLUGIN_OPS = ("Reorg", "RegionDecode", "PyramidRoIAlign")


@dataclass
class EngineResult:
    engine: Path
    sidecar: Path
    layer_report: Path
    info: dict
    layers: dict


def import_backend(backend: str) -> ModuleType:
    import importlib

    if backend not in BACKEND_MODULES:
        raise EngineBuildError(f"unknown engine backend {backend!r}: use tensorrt or tensorrt-rtx")
    try:
        trt = importlib.import_module(BACKEND_MODULES[backend])
    except ImportError as e:
        raise BackendUnavailable(
            f"backend {backend} is not importable ({e}): {INSTALL_HINTS[backend]}; or export "
            "with --backend tensorrt-rtx --target native, or --backend onnx"
        ) from e
    if backend == "tensorrt" and int(trt.__version__.split(".")[0]) < 10:
        raise BackendUnavailable(
            f"TensorRT {trt.__version__} is too old: the plugins and strongly typed networks need TensorRT >= 10"
        )
    return trt


def _logger(trt: ModuleType):
    """A TensorRT logger that forwards to ``logging``. Errors go to debug and are remembered: the exception raised
    afterwards carries the last one, so a failure reads as one line."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.quiet = False  # set while probing things that are expected to fail (deserialising RTX on CPU)

        def log(self, severity, msg) -> None:
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(msg)
                log.debug("%s", msg)
            elif severity == trt.ILogger.WARNING:
                log.debug("%s", msg) if self.quiet else log.warning("%s", msg)

    return Logger()


def _parse(trt, logger, network, onnx_path: Path, backend: str) -> None:
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(onnx_path)):
        return
    err = parser.get_error(0)
    node, op, desc = err.node_name() or f"#{err.node()}", err.node_operator(), err.desc()
    if op in PLUGIN_OPS:
        fix = (
            "TensorRT-RTX has no plugin layer: export with --target native"
            if backend == "tensorrt-rtx"
            else "the plugin is not registered: build the kernels (python -m sidnet.kernels.build), or --target native"
        )
        raise EngineBuildError(f"sidnet::{op} node '{node}' needs the sidnet plugin: {fix} ({desc})")
    raise EngineBuildError(
        f"{backend} {trt.__version__} ONNX parser rejected node '{node}' (op {op}): {desc}; "
        "re-export with --target native, or report the op"
    )


def _device() -> dict:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
    except Exception:  # noqa: BLE001  (a broken CUDA setup only loses this field)
        pass
    return {"gpu": None, "compute_capability": None}


def _network_layers(network) -> dict[str, int]:
    kinds = Counter(str(network.get_layer(i).type).split(".")[-1] for i in range(network.num_layers))
    return dict(sorted(kinds.items()))


def _engine_layers(trt, logger, plan, backend: str, device: dict) -> tuple[int | None, list, str]:
    """(layer count, layer names, note) from IEngineInspector, or (None, [], why not)."""
    if device["gpu"] is None:
        return (
            None,
            [],
            (
                f"not available: the engine inspector needs a deserialised engine, and this machine has no "
                f"CUDA GPU ({backend} built the plan on the CPU)"
            ),
        )
    logger.quiet = True
    try:
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    finally:
        logger.quiet = False
    if engine is None:
        why = logger.errors[-1] if logger.errors else "unknown reason"
        return None, [], f"not available: {backend} cannot deserialise the engine on {device['gpu']} ({why})"
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    layers = info.get("Layers", [])
    names = [entry.get("Name", "?") if isinstance(entry, dict) else str(entry) for entry in layers]
    return len(layers), names, "from IEngineInspector (ProfilingVerbosity.DETAILED)"


def _layer_markdown(layers: dict) -> str:
    lines = [
        "# Layer report",
        "",
        "| graph | count |",
        "|---|---|",
        f"| ONNX nodes | {layers['onnx_nodes']} |",
        f"| TensorRT network layers (parsed) | {layers['network_layers']} |",
        f"| engine layers | {layers['engine_layers'] if layers['engine_layers'] is not None else 'n/a'} |",
        "",
        f"Engine layers: {layers['engine_layers_note']}.",
        "",
        "## ONNX ops",
        "",
    ]
    lines += [f"- {op}: {n}" for op, n in layers["onnx_ops"].items()]
    lines += ["", "## Network layer types", ""] + [f"- {k}: {n}" for k, n in layers["network_layer_types"].items()]
    if layers["engine_layer_names"]:
        lines += ["", "## Engine layers", ""] + [f"- {name}" for name in layers["engine_layer_names"]]
    return "\n".join(lines) + "\n"


def build_engine(
    onnx_path: str | Path,
    out_dir: str | Path,
    *,
    backend: str,
    precision: str,
    batch: tuple[int, int, int] = (1, 16, 64),
    plugin_library: str | Path | None = None,
    timing_cache: str | Path | None = None,
    workspace_mib: int | None = None,
) -> EngineResult:
    """Build ``model.engine`` from ``onnx_path`` into ``out_dir``; writes ``model.engine.json`` (sidecar) and
    ``layers.json`` + ``layers.md``. Metadata (anchors, classes, input size …) comes from the ONNX itself."""
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    plugin_nodes = [n for n in model.graph.node if n.domain == "sidnet"]
    if plugin_nodes and backend == "tensorrt-rtx":
        n = plugin_nodes[0]
        raise EngineBuildError(
            f"sidnet::{n.op_type} node '{n.name}' needs the sidnet plugin, and TensorRT-RTX has no "
            "plugin layer: export with --target native, or build with --backend tensorrt"
        )
    trt = import_backend(backend)
    plugins = None
    if plugin_nodes:
        from sidnet.export.trt_plugins import register_plugins

        plugins = register_plugins(plugin_library)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    lo, opt, hi = batch
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    _parse(trt, logger, network, onnx_path, backend)
    config = builder.create_builder_config()
    if workspace_mib:  # else TensorRT's default; 1 GiB is too little for some FP32 tactics at batch 64
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (lo, *dims[1:]), (opt, *dims[1:]), (hi, *dims[1:]))
    config.add_optimization_profile(profile)
    cache_path = None
    if backend == "tensorrt":  # TensorRT-RTX: timing caches are no-ops (deprecated in 1.2)
        cache_path = Path(timing_cache) if timing_cache else out_dir / "timing.cache"
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        why = logger.errors[-1] if logger.errors else "no error logged (run with -v)"
        hint = "; raise workspace_mib= or lower batch.max=" if "OutOfMemory" in why else ""
        raise EngineBuildError(f"{backend} {trt.__version__} could not build an engine from {onnx_path}: {why}{hint}")
    engine_path = out_dir / "model.engine"
    engine_path.write_bytes(bytes(plan))
    if cache_path is not None:
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    device = _device()
    n_layers, names, note = _engine_layers(trt, logger, plan, backend, device)
    layers = {
        "onnx_nodes": len(model.graph.node),
        "onnx_ops": dict(sorted(Counter(n.op_type for n in model.graph.node).items())),
        "network_layers": network.num_layers,
        "network_layer_types": _network_layers(network),
        "engine_layers": n_layers,
        "engine_layers_note": note,
        "engine_layer_names": names,
    }
    built_on = (
        f"{device['gpu']} (compute capability {device['compute_capability']})"
        if device["gpu"]
        else f"built on CPU ({'TensorRT-RTX' if backend == 'tensorrt-rtx' else backend}), no GPU visible"
    )
    info = {
        "engine": engine_path.name,
        "engine_sha256": sha256_file(engine_path),
        "backend": backend,
        "backend_version": trt.__version__,
        "built_on": built_on,
        **device,
        "precision": precision,
        "strongly_typed": True,
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", *dims[1:]],
            "profile": {"min": [lo, *dims[1:]], "opt": [opt, *dims[1:]], "max": [hi, *dims[1:]]},
            "preprocessing": meta.get("preprocessing"),
        },
        "outputs": meta.get("outputs"),
        **{
            k: json.loads(meta[k])
            for k in ("anchors", "num_classes", "class_names", "input_size", "conf_thresh", "topk")
            if k in meta
        },
        "target": meta.get("target"),
        "plugins": plugins,
        "onnx": {"file": onnx_path.name, "sha256": sha256_file(onnx_path)},
        "timing_cache": str(cache_path) if cache_path else "not used (a no-op in TensorRT-RTX)",
        "build_seconds": round(seconds, 2),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "sidnet_version": meta.get("sidnet_version"),
    }
    sidecar = out_dir / "model.engine.json"
    sidecar.write_text(json.dumps(info, indent=2) + "\n")
    (out_dir / "layers.json").write_text(json.dumps(layers, indent=2) + "\n")
    (out_dir / "layers.md").write_text(_layer_markdown(layers))
    log.info(
        "engine: %s (%s %s, %s), %d ONNX nodes -> %d network layers, engine layers: %s",
        engine_path,
        backend,
        trt.__version__,
        precision,
        layers["onnx_nodes"],
        layers["network_layers"],
        n_layers or "n/a",
    )
    return EngineResult(engine_path, sidecar, out_dir / "layers.json", info, layers)
