"""What the export needs to know of a model family, behind one interface (as :mod:`sidnet.engine.tasks` is for
training): the deploy wrapper, the graph (trace + the rewrites that apply), the ONNX metadata, the parity check, the
precisions its graph supports, whether its ONNX batch is static, and the INT8 plugin swap.

:func:`adapter_for` finds a model's adapter through a small flat registry keyed by model class (the nearest class in
the model's MRO wins); :func:`register_adapter` refuses a class registered twice. The pipeline
(:func:`sidnet.export.pipeline.run_export`) calls the adapter and never tests a model's class itself.

- :class:`RegionExport` — YOLOv2 family (SIDNet): :class:`~sidnet.graph.wrapper.DeployModel` (region decode + top-K),
  :func:`sidnet.graph.build.build_graph`, parity against PyTorch on random batches; fp32, fp16, int8.
- :class:`~sidnet.export.maskrcnn.MaskRCNNExport` — :class:`~sidnet.models.maskrcnn.PersonMaskRCNN`: static-shape
  deploy module, parity on real images against torchvision's eager inference; fp32 only, batch 1.
"""

from __future__ import annotations

from typing import Any, Protocol

import onnx
import torch
from torch import nn

from sidnet.export.maskrcnn import MaskRCNNExport
from sidnet.export.parity import ParityResult, check_parity
from sidnet.graph.build import build_graph, decode_attrs
from sidnet.graph.errors import ExportError
from sidnet.graph.onnx_export import OUTPUTS, PREPROCESSING
from sidnet.graph.wrapper import DeployModel
from sidnet.models.maskrcnn import PersonMaskRCNN
from sidnet.models.yolo import YOLOv2


class ExportAdapter(Protocol):
    family: str  # named in messages
    precisions: tuple[str, ...]  # the --precision values its graph supports
    static_batch: bool  # its ONNX has batch 1 (the engine profile is then 1/1/1)
    backends: tuple[str, ...]  # the --backend values it can be built for

    def prepare_random(self, model: nn.Module, *, seed: int) -> nn.Module: ...  # --random-init: usable untrained

    def deploy(self, model: nn.Module, *, conf_thresh: float, topk: int, backend: str) -> nn.Module: ...

    def build_graph(self, deploy: nn.Module, *, target: str, precision: str,
                    opset: int) -> tuple[onnx.ModelProto, onnx.ModelProto, list[str]]: ...  # fmt: skip

    def metadata(self, model: nn.Module, deploy: nn.Module, *, class_names: list[str], conf_thresh: float,
                 topk: int) -> dict[str, Any]: ...  # fmt: skip

    def doc_string(self, model: nn.Module) -> str: ...

    def check_parity(self, deploy: nn.Module, graph: onnx.ModelProto, *, batches: list[int], seed: int,
                     tolerance: dict) -> ParityResult: ...  # fmt: skip

    def int8_plugins(self, qdq: onnx.ModelProto, deploy: nn.Module) -> tuple[onnx.ModelProto, list[str]]: ...


def calibrate_batchnorm(model: nn.Module, *, seed: int = 0, batches: int = 2, batch_size: int = 2) -> nn.Module:
    """Set BatchNorm running statistics from a few random images; returns the model in eval mode.

    With default initialisation and unit running variance, activations shrink layer after layer until the head
    outputs little more than its bias: every cell gets the same score and a parity check compares ties. Measured
    statistics keep each layer's activations at unit scale, so an untrained model gives distinct, varied outputs.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.rand(batch_size, 3, model.input_size, model.input_size, generator=gen))
    for bn, momentum in zip(norms, momenta, strict=True):
        bn.momentum = momentum
    return model.eval()


class RegionExport:
    """YOLOv2 family: dense head → region decode + top-K (``sidnet::RegionDecode`` with the plugins target)."""

    family = "YOLOv2 family"
    precisions = ("fp32", "fp16", "int8")
    static_batch = False
    backends = ("onnx", "tensorrt", "tensorrt-rtx", "compiled", "triton")

    def prepare_random(self, model, *, seed):
        return calibrate_batchnorm(model, seed=seed)

    def deploy(self, model, *, conf_thresh, topk, backend):  # (one graph for every backend)
        return DeployModel(model, conf_thresh=conf_thresh, topk=topk).eval()

    def build_graph(self, deploy, *, target, precision, opset):
        return build_graph(deploy, target=target, precision=precision, opset=opset)

    def metadata(self, model, deploy, *, class_names, conf_thresh, topk):
        size = model.input_size
        return {
            "anchors": model.anchors.tolist(),
            "num_classes": model.num_classes,
            "class_names": class_names,
            "input_size": size,
            "input": f"images float32 [N, 3, {size}, {size}]",
            "preprocessing": PREPROCESSING,
            "outputs": OUTPUTS,
            "conf_thresh": conf_thresh,
            "topk": topk,
        }

    def doc_string(self, model):
        return f"SIDNet {model.num_classes}-class detector. {PREPROCESSING} {OUTPUTS}"

    def check_parity(self, deploy, graph, *, batches, seed, tolerance):
        return check_parity(deploy, graph, batches=batches, seed=seed, tolerance=tolerance)

    def int8_plugins(self, qdq, deploy):
        from sidnet.graph.surgery import native_to_plugins

        return native_to_plugins(qdq, decode_attrs=decode_attrs(deploy))


_ADAPTERS: dict[type, ExportAdapter] = {}


def register_adapter(model_class: type, adapter: ExportAdapter) -> None:
    """Export ``model_class`` (and its subclasses) through ``adapter``; a class registered twice raises."""
    if model_class in _ADAPTERS:
        raise ValueError(f"an export adapter is already registered for {model_class.__name__}: "
                         f"{type(_ADAPTERS[model_class]).__name__}")  # fmt: skip
    _ADAPTERS[model_class] = adapter


def adapter_for(model: nn.Module, *, source: str = "the model") -> ExportAdapter:
    """The adapter registered for ``model``'s class or its nearest registered base; none → :class:`ExportError`."""
    for cls in type(model).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    families = ", ".join(a.family for a in _ADAPTERS.values())
    raise ExportError(f"{source} holds a {type(model).__name__}, which has no export adapter (exportable: "
                      f"{families}); register one in sidnet.export.adapters")  # fmt: skip


register_adapter(YOLOv2, RegionExport())
register_adapter(PersonMaskRCNN, MaskRCNNExport())
