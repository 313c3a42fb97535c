"""``run_export(cfg)``: checkpoint → ONNX → surgery → parity → (engine) → report. No Hydra below this line."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx
import torch

from sidnet.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from sidnet.export.adapters import ExportAdapter, adapter_for
from sidnet.export.config import BACKENDS, PRECISIONS, TARGETS, ExportConfig
from sidnet.export.parity import ParityResult
from sidnet.export.report import write_report
from sidnet.graph.errors import ExportError, ParityError
from sidnet.graph.onnx_export import set_metadata
from sidnet.graph.surgery import op_counts
from sidnet.io import created_for_this_run, ensure_writable_dir, sha256_file, staged_output
from sidnet.models import build_model
from sidnet.safety import check_input_size, check_output_file

log = logging.getLogger("sidnet.export")

TRT_TOPK_MAX = 3840  # TensorRT's TopK layer limit on K


@dataclass
class Options:
    precision: str
    backend: str
    target: str


@dataclass
class ExportResult:
    out_dir: Path
    onnx_path: Path
    report_path: Path
    options: Options
    surgery: list[str]
    parity: ParityResult
    engine: Any | None  # sidnet.export.engine.EngineResult
    report: dict


def resolve_options(cfg: ExportConfig) -> Options:
    """Validate precision/backend/target/batch/topk; ``target`` defaults to plugins for tensorrt, else native."""
    precision, backend = str(cfg.precision).lower(), str(cfg.backend).lower()
    if precision not in PRECISIONS:
        raise ExportError(f"unsupported precision {cfg.precision!r}: use fp32, fp16 or int8")
    if backend not in BACKENDS:
        raise ExportError(f"unsupported backend {cfg.backend!r}: use {', '.join(BACKENDS)}")
    target = str(cfg.target).lower() if cfg.target else ("plugins" if backend == "tensorrt" else "native")
    if target not in TARGETS:
        raise ExportError(f"unsupported target {cfg.target!r}: use plugins (TensorRT) or native (any backend)")
    if precision == "int8":
        from sidnet.quant.calibration import METHODS
        from sidnet.quant.qdq import import_modelopt

        if cfg.int8.method not in METHODS:
            raise ExportError(f"unknown calibration method {cfg.int8.method!r}: use {', '.join(METHODS)}")
        if cfg.int8.images and cfg.int8.data:
            raise ExportError("pass one of --calib-images FOLDER or --calib-data conf/data/X.yaml, not both")
        import_modelopt()
    if backend == "triton" and target == "plugins":
        raise ExportError("--backend triton serves standard ONNX ops (or a plan built from them): use --target native")
    if backend == "compiled" and target == "plugins":
        raise ExportError("--backend compiled packages the PyTorch network: use --target native (the default)")
    if backend == "tensorrt-rtx" and target == "plugins":
        raise ExportError("TensorRT-RTX has no plugin layer: use --target native, or --backend tensorrt for plugins")
    b = cfg.batch
    if not 1 <= b.min <= b.opt <= b.max:
        raise ExportError(f"batch profile min={b.min} opt={b.opt} max={b.max} must satisfy 1 <= min <= opt <= max")
    if cfg.topk < 1 or (backend not in ("onnx", "compiled") and cfg.topk > TRT_TOPK_MAX):
        raise ExportError(f"topk={cfg.topk} must be in 1..{TRT_TOPK_MAX} (TensorRT's TopK limit)")
    if not 0.0 <= cfg.conf_thresh < 1.0:
        raise ExportError(f"conf_thresh={cfg.conf_thresh} must be in [0, 1)")
    return Options(precision, backend, target)


def preflight(opts: Options, cfg: ExportConfig) -> None:
    """Fail before the (slow) export when the engine backend or the plugins' kernels library is missing."""
    if opts.backend in ("onnx", "compiled") or (opts.backend == "triton" and cfg.triton.format != "plan"):
        return
    from sidnet.export.engine import import_backend

    import_backend("tensorrt" if opts.backend == "triton" else opts.backend)
    if opts.target == "plugins":
        from sidnet.export.trt_plugins import load_kernels

        load_kernels(cfg.plugin_library)


def _check_input_size(size: int, where: str) -> None:
    check_input_size(size, where=where, fix="use e.g. 416 or 320")


def load_model(cfg: ExportConfig, *, project_root: Path) -> tuple[torch.nn.Module, str, str, list[str] | None]:
    """(model in eval mode, registry name, description of the weights, the checkpoint's class names or None)."""
    if cfg.checkpoint and cfg.random_init:
        raise ExportError("pass either --checkpoint or --random-init, not both")
    if not cfg.checkpoint:
        if cfg.input_size is not None:
            raise ExportError("input_size= applies to --checkpoint; with --random-init set model.input_size=N")
        if not cfg.random_init:
            raise ExportError(
                "no checkpoint: pass --checkpoint runs/<name>/best.pt (or --random-init --model sidnet "
                "for a smoke test with untrained weights)"
            )
        model = _random_model(cfg, project_root=project_root)
        return model, cfg.model.name, f"random init (untrained, seed {cfg.seed})", None
    path = Path(cfg.checkpoint)
    state = load_checkpoint(path)
    spec = state.get("model")
    if not isinstance(spec, dict) or not {"name", "anchors", "num_classes", "input_size"} <= set(spec):
        raise CheckpointError(
            f"{path} has no model description (state['model']); use a checkpoint written by `python -m train`"
        )
    _check_input_size(int(spec["input_size"]), f"from checkpoint {path}")
    if cfg.input_size is not None:
        _check_input_size(int(cfg.input_size), "input_size")
    try:
        model = model_from_checkpoint(state, ema=cfg.ema, input_size=cfg.input_size)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path}: cannot rebuild {spec['name']!r} from it ({type(e).__name__}: {first[:200]}); "
            "use a checkpoint written by `python -m train` with this sidnet version"
        ) from e
    adapter_for(model, source=str(path))  # an exportable family, or one line naming those that are
    names = (state.get("config") or {}).get("data", {}).get("class_names")
    ema = " (EMA weights)" if cfg.ema and state.get("ema") is not None else ""
    if cfg.input_size is not None and int(cfg.input_size) != int(spec["input_size"]):
        ema += f" at input {int(cfg.input_size)} (trained at {int(spec['input_size'])})"
    if state.get("quant"):  # QAT: the trained weights without fake quantization, its ranges kept beside them
        model.qat = {**state["quant"], "checkpoint": str(path), "epoch": state.get("epoch")}
        ema += " (QAT-trained, fake quantization removed)"
    return model, str(spec["name"]), f"checkpoint {path} sha256 {sha256_file(path)}{ema}", names


def _random_model(cfg: ExportConfig, *, project_root: Path) -> torch.nn.Module:
    m = cfg.model
    _check_input_size(int(m.input_size), "model.input_size")
    anchors = m.anchors
    if anchors is not None and not isinstance(anchors, (list, tuple)):
        from sidnet.anchors import load_anchors

        try:
            anchors = load_anchors(anchors, project_root=project_root)
        except (FileNotFoundError, ValueError) as e:
            raise ExportError(str(e)) from e
    kwargs = dict(m.kwargs)
    for key in ("pretrained", "weights"):
        if key in kwargs:
            kwargs[key] = None  # random init means random: no ImageNet trunk
    if anchors is not None:
        kwargs["anchors"] = [list(map(float, a)) for a in anchors]
    torch.manual_seed(cfg.seed)
    try:
        model = build_model(m.name, num_classes=m.num_classes, input_size=m.input_size, **kwargs)
    except (KeyError, ValueError, TypeError) as e:
        raise ExportError(f"cannot build model {m.name!r}: {e.args[0] if e.args else e}") from e
    return adapter_for(model, source=f"model {m.name!r}").prepare_random(model, seed=cfg.seed)


def _class_names(cfg: ExportConfig, from_checkpoint: list[str] | None, num_classes: int) -> list[str]:
    names = list(cfg.class_names) if cfg.class_names else from_checkpoint
    if names is None:
        names = ["person"] if num_classes == 1 else [f"class{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ExportError(f"{len(names)} class_names {names} for a model with {num_classes} classes: fix class_names")
    return [str(n) for n in names]


def default_out_dir(cfg: ExportConfig, *, project_root: Path) -> Path:
    """``out=``, else one folder per precision and backend beside the checkpoint, so that exports in several
    precisions (the README's fp32 → fp16 → int8 sequence) never collide: ``<run>/export/fp32``,
    ``<run>/export/int8``, ``<run>/export/tensorrt-rtx_fp16``, ``<run>/export/triton_fp32``."""
    if cfg.out:
        return Path(cfg.out)
    precision, backend = str(cfg.precision).lower(), str(cfg.backend).lower()
    leaf = precision if backend == "onnx" else f"{backend}_{precision}"
    if cfg.checkpoint:
        return Path(cfg.checkpoint).parent / "export" / leaf
    return project_root / "outputs" / "export" / f"{cfg.model.name}-random" / leaf


def _metadata_common(cfg: ExportConfig, opts: Options, name: str, source: str) -> dict:
    import sidnet

    return {
        "sidnet_version": sidnet.__version__,
        "model": name,
        "weights": source,
        "target": opts.target,
        "precision": opts.precision,
        "exporter": f"torch {torch.__version__} torch.onnx.export(dynamo=True), opset {cfg.opset}",
    }


def _report(opts: Options, meta: dict, exported, final, surgery: list[str], checker: str, parity: ParityResult) -> dict:
    import onnx_graphsurgeon
    import onnxruntime

    from sidnet.environment import environment

    return {
        "environment": environment(),
        "versions": {
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "onnx_graphsurgeon": onnx_graphsurgeon.__version__,
        },
        "precision": opts.precision,
        "backend": opts.backend,
        "target": opts.target,
        "conf_thresh": meta["conf_thresh"],
        "topk": meta["topk"],
        "model": {
            "name": meta["model"],
            "input_size": meta["input_size"],
            "anchors": meta["anchors"],
            "class_names": meta["class_names"],
            "source": meta["weights"],
        },
        "onnx": {
            "exported_nodes": len(exported.graph.node),
            "exported_ops": op_counts(exported),
            "final_nodes": len(final.graph.node),
            "final_ops": op_counts(final),
            "opset": final.opset_import[0].version,
            "checker": checker,
        },
        "surgery": surgery,
        "parity": {**parity.to_dict(), "summary": parity.summary()},
        "files": {},
    }


def _quantize(cfg, opts, exported, final, meta, surgery, out_dir, model, deploy, adapter, project_root):
    """FP32 native graph → Q/DQ graph (+ plugins surgery when asked); returns (graph, Int8Result, surgery log)."""
    from sidnet.graph.onnx_export import module_scopes
    from sidnet.quant.ptq import quantize_export
    from sidnet.quant.qdq import graph_placement, qat_tensor_amax

    qat = getattr(model, "qat", None)
    qat_amax = None
    if qat is not None:
        sites, _ = graph_placement(final, module_scopes(exported), size=model.input_size, exclude=cfg.int8.exclude)
        qat_amax = qat_tensor_amax(sites, qat["amax"])
    result = quantize_export(final, cfg.int8, out_dir, size=model.input_size, project_root=project_root,
                             force=cfg.force, qat_amax=qat_amax, qat=qat)  # fmt: skip
    qdq = result.qdq
    surgery = [*surgery, f"int8: modelopt Q/DQ on {len(result.manifest['quantized_layers'])} layers, "
               f"{result.manifest['cache']['tensors']} activation scales from {result.cache.name}"]  # fmt: skip
    if opts.target == "plugins":
        qdq, lines = adapter.int8_plugins(qdq, deploy)
        surgery += lines
    set_metadata(qdq, meta)
    return qdq, result, surgery


def run_export(cfg: ExportConfig, *, project_root: Path) -> ExportResult:
    """The whole export; raises :class:`ExportError` (or ``CheckpointError``) with one-line messages."""
    opts = resolve_options(cfg)
    preflight(opts, cfg)
    out_dir = default_out_dir(cfg, project_root=project_root)
    with created_for_this_run(out_dir):
        return _run_export(cfg, opts, out_dir, project_root=project_root)


def _run_export(cfg: ExportConfig, opts: Options, out_dir: Path, *, project_root: Path) -> ExportResult:
    import sidnet

    ensure_writable_dir(out_dir, fix="pass --out a folder you can write to")
    for name in ("model.onnx", "report.json", "report.md"):  # every export writes these: refuse a FIFO/folder now
        check_output_file(out_dir / name)
    if opts.precision == "int8":  # before the minutes of ONNX export, calibration and gate, not after them
        from sidnet.quant.ptq import refuse_overwrite

        refuse_overwrite(out_dir, force=cfg.force)
    model, name, source, ckpt_names = load_model(cfg, project_root=project_root)
    qat = getattr(model, "qat", None)
    if opts.precision == "int8" and qat is None and not (cfg.int8.images or cfg.int8.data):
        raise ExportError("INT8 needs a calibration set: pass exactly one of --calib-images FOLDER or "
                          "--calib-data conf/data/X.yaml (a QAT checkpoint brings its own ranges)")  # fmt: skip
    if qat is not None and opts.precision != "int8":
        log.warning("export: %s is a QAT checkpoint; exporting its trained weights in %s with the fake quantization "
                    "removed (--precision int8 exports the Q/DQ graph with its ranges)", cfg.checkpoint, opts.precision)
    class_names = _class_names(cfg, ckpt_names, model.num_classes)
    log.info("export: %s, %s, target %s, backend %s -> %s", source, opts.precision, opts.target, opts.backend, out_dir)

    # Everything is written aside and moved into out_dir only once all of it passed: an error or Ctrl-C leaves out_dir
    # as it was (a finished artifact set or none), never a model.onnx without its parity check and report.
    with staged_output(out_dir) as work:
        int8 = opts.precision == "int8"
        graph_precision, graph_target = ("fp32", "native") if int8 else (opts.precision, opts.target)
        int8_result = None
        adapter: ExportAdapter = adapter_for(model)
        if opts.precision not in adapter.precisions:
            raise ExportError(f"{adapter.family} exports in {', '.join(adapter.precisions)} only for now, not "
                              f"{opts.precision}; use --precision {adapter.precisions[0]}")  # fmt: skip
        if opts.backend not in adapter.backends:
            raise ExportError(f"{adapter.family} cannot be built for --backend {opts.backend} yet; use --backend "
                              f"{' | '.join(adapter.backends)}")  # fmt: skip
        deploy = adapter.deploy(model, conf_thresh=cfg.conf_thresh, topk=cfg.topk, backend=opts.backend)
        exported, final, surgery = adapter.build_graph(deploy, target=graph_target, precision=graph_precision,
                                                       opset=cfg.opset)  # fmt: skip
        meta = {
            **_metadata_common(cfg, opts, name, source),
            **adapter.metadata(model, deploy, class_names=class_names, conf_thresh=cfg.conf_thresh, topk=cfg.topk),
        }
        final.doc_string = adapter.doc_string(model)
        final.producer_name, final.producer_version = "sidnet", sidnet.__version__
        set_metadata(final, {**meta, "precision": "fp32", "target": "native"} if int8 else meta)
        if int8:
            final, int8_result, surgery = _quantize(cfg, opts, exported, final, meta, surgery, work, model, deploy,
                                                    adapter, project_root)  # fmt: skip
        try:
            onnx.checker.check_model(final, full_check=opts.target == "native")
            checker = "passed" + ("" if opts.target == "native" else " (sidnet:: ops are not checked by schema)")
        except onnx.checker.ValidationError as e:
            raise ExportError(f"onnx.checker rejected the exported graph: {str(e).splitlines()[0]}") from e
        onnx_path = work / "model.onnx"
        onnx.save(final, str(onnx_path))

        # INT8: parity of the calibrated FP32 graph (the surgery); INT8 vs FP32 accuracy is the gate's job.
        probe = onnx.load(str(int8_result.fp32_path)) if int8 else final
        parity = adapter.check_parity(deploy, probe, batches=list(cfg.parity.batches), seed=cfg.seed,
                                      tolerance=dict(getattr(cfg.parity, graph_precision)))  # fmt: skip
        log.info("parity%s: %s", " (FP32 source of the INT8 graph)" if int8 else "", parity.summary())
        report = _report(opts, meta, exported, final, surgery, checker, parity)
        report["files"][onnx_path.name] = sha256_file(onnx_path)
        if int8:
            from sidnet.quant.ptq import finish_manifest

            manifest_path = finish_manifest(work, int8_result.manifest, onnx_path)
            report["int8"] = int8_result.manifest
            for path in (int8_result.fp32_path, int8_result.cache, manifest_path):
                report["files"][path.name] = sha256_file(path)
        if not parity.passed:  # nothing joins the artifact set; the report says why, in a folder of its own
            failed = out_dir / "parity_failed"
            failed.mkdir(exist_ok=True)
            write_report(failed, report)
            raise ParityError(f"exported graph does not match PyTorch: {parity.summary()}; nothing exported, see "
                              f"{failed / 'report.md'}")

        engine = None
        if opts.backend == "compiled":
            from sidnet.export.compiled import export_compiled

            package, sidecar = export_compiled(model, work, precision=opts.precision, conf_thresh=cfg.conf_thresh,
                                               topk=cfg.topk, max_batch=cfg.batch.max, meta=meta,
                                               device=cfg.compiled_device, mode=cfg.compiled_mode)  # fmt: skip
            report["compiled"] = sidecar
            report["files"][package.name] = sidecar["package_sha256"]
        elif opts.backend != "onnx" and not (opts.backend == "triton" and cfg.triton.format != "plan"):
            from sidnet.export.engine import build_engine

            b = cfg.batch
            batch = (1, 1, 1) if adapter.static_batch else (b.min, b.opt, b.max)  # a static ONNX has batch 1
            engine = build_engine(
                onnx_path,
                work,
                backend="tensorrt" if opts.backend == "triton" else opts.backend,
                precision=opts.precision,
                batch=batch,
                plugin_library=cfg.plugin_library,
                timing_cache=cfg.timing_cache or out_dir / "timing.cache",  # a cache, reused across exports
                workspace_mib=cfg.workspace_mib,
            )
            layers = {k: v for k, v in engine.layers.items() if k != "engine_layer_names"}
            report["engine"] = {"info": engine.info, "layers": layers}
            report["files"][engine.engine.name] = engine.info["engine_sha256"]
        if opts.backend == "triton":
            from sidnet.export.triton import write_repository

            t, b = cfg.triton, cfg.batch
            batch = (1, 1, 1) if adapter.static_batch else (b.min, b.opt, b.max)
            config = write_repository(onnx_path, work, name=t.name or name, batch=batch, fmt=t.format,
                                      engine_path=engine.engine if engine is not None else None,
                                      instances=t.instances, kind=t.kind, queue_delay_us=t.queue_delay_us)  # fmt: skip
            rel = str(config.relative_to(work))
            report["triton"] = {"repository": str(out_dir), "config": rel, "format": t.format, "batch": list(batch)}
            report["files"][rel] = sha256_file(config)
        write_report(work, report)
    onnx_path, report_path = out_dir / onnx_path.name, out_dir / "report.md"
    if engine is not None:
        engine = replace(engine, engine=out_dir / engine.engine.name, sidecar=out_dir / engine.sidecar.name,
                         layer_report=out_dir / engine.layer_report.name)  # fmt: skip
    log.info("export: wrote %s and %s in %s", ", ".join(sorted(report["files"])), report_path.name, out_dir)
    return ExportResult(out_dir, onnx_path, report_path, opts, surgery, parity, engine, report)
