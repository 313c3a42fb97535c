"""Building blocks shared by every YOLOv2-family model: conv-norm-act and reorg."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

LayerFactory = Callable[..., nn.Module]


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) → norm → activation, padding keeps the spatial size at stride 1.

    The three-layer pattern is what TensorRT fuses into one kernel (the SIDNet paper's 96 → 30 layers).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        norm_layer: LayerFactory = nn.BatchNorm2d,
        act_layer: LayerFactory = nn.ReLU,
    ) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
            norm_layer(out_channels),
            act_layer(inplace=True),
        )
        self.out_channels = out_channels


def reorg(x: torch.Tensor, stride: int = 2) -> torch.Tensor:
    """Space-to-depth with ONNX ``SpaceToDepth`` channel order.

    ``out[n, (by * s + bx) * C + c, h, w] = x[n, c, h * s + by, w * s + bx]`` for (N, C, H, W) → (N, C·s², H/s, W/s).

    Darknet's ``reorg`` layer scrambles channels differently (it reinterprets the (C, H, W) buffer as
    (C/s², H·s, W·s)); that order only matters when loading Darknet weights, which SIDNet does not. We pick the
    ONNX order so the native export is a single ``SpaceToDepth`` node that TensorRT and TensorRT-RTX run
    natively, and the ``Reorg`` plugin kernel in ``csrc/reorg`` implements exactly this formula.
    """
    n, c, h, w = x.shape
    if h % stride or w % stride:
        raise ValueError(f"reorg: spatial size {h}x{w} is not a multiple of stride {stride}")
    x = x.reshape(n, c, h // stride, stride, w // stride, stride)
    return x.permute(0, 3, 5, 1, 2, 4).reshape(n, c * stride * stride, h // stride, w // stride)


class Reorg(nn.Module):
    """Module form of :func:`reorg` so that export and graph surgery can find it by type."""

    def __init__(self, stride: int = 2) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reorg(x, self.stride)

    def extra_repr(self) -> str:
        return f"stride={self.stride}"
