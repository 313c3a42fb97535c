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


def fuse_for_inference(model: nn.Module, *, cudnn_relu: bool = False) -> nn.Module:
    """A copy of ``model`` in eval mode with every ConvNormAct (BatchNorm norm) replaced by :class:`ConvBiasAct`."""
    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ConvNormAct) and isinstance(child[1], nn.BatchNorm2d):
                conv, bn, act = child[0], child[1], child[2]
                setattr(parent, name, ConvBiasAct(fuse_conv_bn_eval(conv, bn), act, cudnn_relu=cudnn_relu))
    return model
