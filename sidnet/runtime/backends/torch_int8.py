"""``torch`` backend, INT8: a Q/DQ ONNX export run on the GPU's INT8 tensor cores, without TensorRT.

``python -m deploy runs/x/export/int8/model.onnx --backend torch`` (or ``Detector(path, backend="torch")``): the
export's Q/DQ graph is planned into INT8 layers (:mod:`sidnet.quant.int8_plan`: per-channel weight scales and
per-tensor activation scales from the graph itself, the layers the accuracy gate kept in float kept in float), run
by the Triton INT8 kernels (:mod:`sidnet.kernels.int8`: INT8 × INT8 → INT32, bias + ReLU + requantisation in the
epilogue, NHWC int8 between layers), followed by the csrc region decode + top-K kernel, the whole batch captured in
one CUDA graph per batch size by :class:`~sidnet.runtime.backends.torch.GraphRunner` (GPU letterbox included).

On a CPU (CI) the same plan runs eagerly with the exact integer reference of the kernels (or the kernels themselves
under ``TRITON_INTERPRET=1``), in float32.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from sidnet.runtime.artifact import onnx_info
from sidnet.runtime.backends.torch import GraphRunner, decode_tail, resolve_device
from sidnet.runtime.errors import DeployError


class Int8Backend(GraphRunner):
    name = "torch"

    def __init__(self, path: Path, *, device: str = "auto", conf_thresh: float = 0.001, topk: int = 100,
                 precision: str | None = None, graphs: bool = True, use_kernel: bool | None = None,
                 tune: bool | None = None) -> None:  # fmt: skip
        from sidnet.quant.int8_plan import Int8Network, Int8PlanError, plan_from_onnx

        if precision not in (None, "int8", "fp8"):
            raise DeployError(f"{path} is an ONNX file: the torch backend runs an ONNX only as INT8 or FP8 (its "
                              f"Q/DQ graph's scales), not {precision!r}; pass the checkpoint (.pt) for "
                              f"{precision}")  # fmt: skip
        precision = precision or "int8"
        dev = resolve_device(device)
        info = onnx_info(path)
        try:
            self.plan = plan_from_onnx(path)
        except Int8PlanError as e:
            raise DeployError(str(e)) from None
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
        info.backend, info.precision, info.topk, info.conf_thresh = "torch", precision, topk, conf_thresh
        try:
            self.net = Int8Network(self.plan, device=dev, dtype=dtype, tune=tune, precision=precision)
        except ValueError as e:
            raise DeployError(f"{path}: {e}") from None
        head = SimpleNamespace(input_size=info.input_size,
                               anchors=torch.tensor(info.anchors, dtype=torch.float32, device=dev))  # fmt: skip
        tail, self.decode = decode_tail(head, conf_thresh=conf_thresh, topk=topk,
                                        use_kernel=use_kernel if dev.type == "cuda" else False)  # fmt: skip
        net = self.net

        def forward(x):
            return tail(net(x))

        super().__init__(forward, info=info, device=dev, dtype=dtype, channels_last=False, graphs=graphs)


def open_backend(path: Path, **options) -> Int8Backend:
    unknown = set(options) - {"device", "conf_thresh", "topk", "precision", "graphs", "use_kernel", "tune"}
    if unknown:
        raise DeployError(f"torch backend options {sorted(unknown)} do not apply to an INT8 ONNX ({path})")
    return Int8Backend(Path(path), **options)
