"""Quantization-aware training (QAT): fake INT8 in PyTorch exactly where ``python -m export --precision int8`` puts
Q/DQ nodes, starting from the same calibration.

Placement is taken from the export itself (:func:`sidnet.quant.qdq.model_placement`): the model is exported to
its FP32 graph after surgery and modelopt's ONNX quantizer places Q/DQ on it (last 1x1 conv and decode excluded, as
the export does); every quantized activation tensor becomes a module input to fake-quantize (a conv's, a MaxPool's,
or a residual block's whose Add reads it), every quantized conv weight a per-output-channel weight quantizer.
Activations are per tensor, symmetric, ``amax`` from calibration and fixed while training; weights per output channel,
symmetric, ``amax`` = the current per-channel max, recomputed every step, which is what the export computes from the
exported weights (BatchNorm folding scales output channels, which per-channel symmetric quantization commutes with).
Fake quantization and its straight-through gradient are modelopt's (``modelopt.torch.quantization``).

Calibration: :mod:`sidnet.quant.calibration`'s streaming |x| histograms and amax methods (entropy, minmax,
percentile), the deployment preprocessing, collected at each of those module inputs — the tensor its ONNX Q/DQ pair
quantizes. A QAT run therefore starts from the PTQ model that the export would build.

Checkpoint (plain data, ``weights_only=True``): ``state["quant"]`` = :func:`prepare`'s record (``amax``: module path →
float, ``weights``: conv paths, the calibration's provenance); the model state also holds modelopt's
``<module>.input_quantizer._amax`` tensors. :func:`insert_quantizers` rebuilds the fake-quant model from it;
:func:`sidnet.checkpoint.fp32_weights` drops the quantizer entries (the trained weights with fake quantization removed).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sidnet.config import ConfigError

log = logging.getLogger("sidnet.qat")


def import_mtq():
    from sidnet.quant.qdq import import_quietly

    return import_quietly("modelopt.torch.quantization", needed_by="quant=qat", error=ConfigError)


def fake_quant_model(state: dict, *, ema: bool = True, input_size: int | None = None) -> nn.Module:
    """The fake-quantized model a QAT checkpoint (``state["quant"]``) trained, its weights loaded (needs modelopt);
    ``input_size`` as :func:`sidnet.checkpoint.model_from_checkpoint`."""
    from sidnet.checkpoint import model_from_checkpoint

    quant = state["quant"]
    return model_from_checkpoint(
        state, ema=ema, input_size=input_size,
        before_load=lambda m: insert_quantizers(m, quant["amax"], quant["weights"]),
    )  # fmt: skip


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def calibrate(model: nn.Module, layers: list[str], cset, *, method: str, percentile: float) -> dict[str, float]:
    """``{layer path: input amax}`` from ``cset`` (a :class:`~sidnet.quant.calibration.CalibrationSet`), the same
    streaming histograms and ``method`` as the INT8 export's calibration. ``model`` must not be quantized yet."""
    from tqdm import tqdm

    from sidnet.quant.calibration import AbsHistogram, activation_amax

    modules = dict(model.named_modules())
    stats = {n: AbsHistogram() for n in layers}
    hooks = [modules[n].register_forward_pre_hook(lambda _m, args, n=n: stats[n].add(args[0].detach().cpu().numpy()))
             for n in layers]  # fmt: skip
    was_training, device = model.training, _device(model)
    try:
        model.eval()
        with torch.no_grad():
            for batch in tqdm(cset, total=cset.num_batches, desc="qat calibration", unit="batch", disable=None):
                model(torch.from_numpy(batch).to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {n: float(a) for n, a in activation_amax(stats, method=method, percentile=percentile).items()}


def insert_quantizers(model: nn.Module, amax: dict[str, float], weights: list[str]) -> nn.Module:
    """Fake-quantize ``model`` in place (modelopt): the input of each module in ``amax``, per tensor with that amax;
    the weights of the convs in ``weights``, per output channel with their dynamic max. Convs and MaxPools use the
    ``input_quantizer`` modelopt gives them; any other module (a residual block whose Add reads its quantized input)
    gets a modelopt ``TensorQuantizer`` child of that name applied by a forward pre-hook."""
    mtq = import_mtq()
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    modules = dict(model.named_modules())
    unknown = [n for n in amax if n not in modules] + [n for n in weights if not isinstance(modules.get(n), nn.Conv2d)]
    if unknown:
        raise ConfigError(f"QAT ranges name {len(unknown)} layer(s) this model does not have (first: {unknown[0]}): "
                          "the checkpoint was written for another architecture")  # fmt: skip
    config = {
        "quant_cfg": [{"quantizer_name": "*", "enable": False}]
        + [{"quantizer_name": f"{n}.weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}} for n in weights]
        + [{"quantizer_name": f"{n}.input_quantizer", "cfg": {"num_bits": 8, "axis": None}} for n in amax],
        "algorithm": None,  # no modelopt calibration: the input ranges are ours, the weight ranges dynamic
    }
    with contextlib.redirect_stdout(io.StringIO()):
        model = mtq.quantize(model, config, forward_loop=None)
    modules = dict(model.named_modules())
    device = _device(model)
    for name, value in amax.items():
        module = modules[name]
        if not isinstance(getattr(module, "input_quantizer", None), TensorQuantizer):
            module.add_module("input_quantizer", TensorQuantizer(QuantizerAttributeConfig(num_bits=8, axis=None)))
            module.register_forward_pre_hook(_quantize_input)
        module.input_quantizer.amax = torch.tensor(float(value), device=device)
    return model


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (module.input_quantizer(args[0]), *args[1:])


def load_init_weights(model: nn.Module, *, path: str | Path, spec: dict) -> str:
    """Load ``quant.init_from``'s weights (EMA when present) into ``model`` built from ``spec``; returns its sha256.
    A checkpoint of another model, or one that is already QAT, raises one line."""
    from sidnet.checkpoint import CheckpointError, load_checkpoint
    from sidnet.io import sha256_file

    path = Path(path)
    state = load_checkpoint(path)
    other = state.get("model") if isinstance(state.get("model"), dict) else {}
    same = all(other.get(k) == spec[k] for k in ("name", "num_classes", "input_size"))
    same = same and _same_anchors(other.get("anchors"), spec["anchors"])
    if not same:
        raise CheckpointError(
            f"quant.init_from {path} holds {other.get('name')!r} (input {other.get('input_size')}, anchors "
            f"{other.get('anchors')}), not the configured {spec['name']!r} (input {spec['input_size']}, anchors "
            f"{spec['anchors']}): pass the model=/model.anchors=/model.input_size= it was trained with"
        )
    if state.get("quant"):
        raise CheckpointError(f"quant.init_from {path} is already a QAT checkpoint: continue its run with "
                              "resume=true, or start from the FP32 checkpoint it was fine-tuned from")  # fmt: skip
    weights = state["ema"] if state.get("ema") is not None else state["model_state"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"quant.init_from {path}: its weights do not fit the configured {spec['name']!r} "
                              f"({first[:160]}); pass the model.kwargs it was trained with") from e  # fmt: skip
    return sha256_file(path)


def _same_anchors(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-6, atol=1e-6))


def prepare(model: nn.Module, *, cset, source: str, method: str, percentile: float, init_from: dict) -> dict:
    """Find where the INT8 export puts Q/DQ (:func:`sidnet.quant.qdq.model_placement`), calibrate those inputs
    of ``model`` (trained FP32 weights) on ``cset`` and insert the fake quantizers; returns the plain record the
    checkpoint keeps as ``state["quant"]``."""
    import importlib.metadata as md

    from sidnet.models import YOLOv2
    from sidnet.quant.qdq import model_placement

    if not isinstance(model, YOLOv2):
        raise ConfigError(f"quant=qat supports the YOLOv2 family (sidnet, sidnet_mobilenetv2, yolov2), not a "
                          f"{type(model).__name__}: its INT8 export is not built")  # fmt: skip
    sites, weights = model_placement(model)
    log.info("qat: calibrating %d quantized inputs (%d conv weights quantized) on %d batch(es) of %d from %s, "
             "method %s", len(sites), len(weights), cset.num_batches, cset.batch_size, source, method)  # fmt: skip
    amax = calibrate(model, list(sites), cset, method=method, percentile=percentile)
    _check_shared(sites, amax)
    insert_quantizers(model, amax, weights)
    return {
        "amax": amax,
        "weights": weights,
        "sites": sites,
        "method": method,
        "percentile": percentile if method == "percentile" else None,
        "calibration": {
            "source": source,
            "images": len(cset.used),
            "batches": cset.num_batches,
            "batch_size": cset.batch_size,
            "image_list_sha256": cset.digest(),
        },  # fmt: skip
        "weight_ranges": "per-output-channel symmetric, amax = current per-channel max (dynamic)",
        "init_from": init_from,
        "modelopt": md.version("nvidia-modelopt"),
    }


def _check_shared(sites: dict[str, str], amax: dict[str, float]) -> None:
    """Modules the export says read one tensor must have measured the same input (else the mapping is wrong)."""
    from sidnet.quant.qdq import ranges_by_tensor

    for tensor, ranges in ranges_by_tensor(sites, amax).items():
        values = list(ranges.values())
        if max(values) > min(values) * (1 + 1e-4) + 1e-12:
            raise ConfigError(f"QAT placement: {', '.join(ranges)} should all read ONNX tensor {tensor} but measured "
                              f"different ranges {values}; this architecture's module inputs do not map onto the "
                              "export's Q/DQ tensors")  # fmt: skip


def freeze_norm(model: nn.Module) -> None:
    """BatchNorm layers to eval mode (running statistics kept, as the export folds them)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
