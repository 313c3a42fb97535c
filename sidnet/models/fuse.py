"""Inference-time fusion of :class:`~sidnet.models.layers.ConvNormAct`: BatchNorm folded into the conv's weights and
bias, and — for ReLU on CUDA — one cuDNN fused conv + bias + ReLU call instead of three kernels.

Why: in eager FP16 the BatchNorm and the activation are each a full read and write of every feature map; folded and
fused, the conv's epilogue does both, which is what TensorRT's 96 → 30 layer fusion did for SIDNet.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from sidnet.models.layers import ConvNormAct


class ConvBiasAct(nn.Module):
    """Conv2d with bias → activation; ``cudnn_relu`` uses ``torch.cudnn_convolution_relu`` (one kernel) on CUDA.

    ``forward`` has the contract of the :class:`ConvNormAct` it replaces (same output in eval mode, up to rounding).
    """

    def __init__(self, conv: nn.Conv2d, act: nn.Module, *, cudnn_relu: bool = False) -> None:
        super().__init__()
        self.conv, self.act = conv, act
        self.cudnn_relu = cudnn_relu and isinstance(act, nn.ReLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if self.cudnn_relu and x.is_cuda:
            return torch.cudnn_convolution_relu(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        y = F.conv2d(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        if isinstance(self.act, nn.ReLU):
            return F.relu_(y)
        if isinstance(self.act, nn.LeakyReLU):
            return F.leaky_relu_(y, self.act.negative_slope)
        return self.act(y)


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2, 2)``; on channels-last CUDA tensors the ``csrc/maxpool`` kernel (one coalesced pass, 16-byte
    vectors) instead of PyTorch's NHWC pooling. Same values either way: max is exact."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            from sidnet.kernels import maxpool2x2_nhwc

            return maxpool2x2_nhwc(x)
        return F.max_pool2d(x, 2, 2)


def fuse_for_inference(model: nn.Module, *, cudnn_relu: bool = False, kernel_pool: bool = False) -> nn.Module:
    """A copy of ``model`` in eval mode with every ConvNormAct (BatchNorm norm) replaced by :class:`ConvBiasAct`, and,
    with ``kernel_pool``, every ``MaxPool2d(2, 2)`` by :class:`MaxPool2x2` (needs the built kernels library)."""
    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ConvNormAct) and isinstance(child[1], nn.BatchNorm2d):
                conv, bn, act = child[0], child[1], child[2]
                setattr(parent, name, ConvBiasAct(fuse_conv_bn_eval(conv, bn), act, cudnn_relu=cudnn_relu))
            elif kernel_pool and isinstance(child, nn.MaxPool2d) and _is_2x2(child):
                setattr(parent, name, MaxPool2x2())
    return model


def _is_2x2(m: nn.MaxPool2d) -> bool:
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    return (pair(m.kernel_size) == (2, 2) and pair(m.stride) == (2, 2) and pair(m.padding) == (0, 0)
            and pair(m.dilation) == (1, 1) and not m.ceil_mode)  # fmt: skip
