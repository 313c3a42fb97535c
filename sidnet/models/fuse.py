"""Inference-time fusion of :class:`~sidnet.models.layers.ConvNormAct`: BatchNorm folded into the conv's weights and
bias, and — for ReLU on CUDA — one cuDNN fused conv + bias + ReLU call instead of three kernels; optionally the
``csrc/`` max-pool kernel and the fused stem (first conv + activation + max-pool) kernel.

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


class StemConvActPool(nn.Module):
    """A :class:`ConvBiasAct` on the 3-channel input (3x3, stride 1, padding 1) followed by ``MaxPool2d(2, 2)``, as one
    ``csrc/stem`` kernel on channels-last CUDA input (the conv's 416x416xK output never reaches memory). Elsewhere
    (CPU, NCHW) the two layers run as before: the same function (max commutes with bias and monotone activations)."""

    def __init__(self, layer: ConvBiasAct) -> None:
        super().__init__()
        self.layer = layer
        act = layer.act
        self.act = "relu" if isinstance(act, nn.ReLU) else "leaky_relu" if isinstance(act, nn.LeakyReLU) else "identity"
        self.slope = float(act.negative_slope) if isinstance(act, nn.LeakyReLU) else 0.0
        self._host: tuple | None = None  # fp32 host copies of the weights (graph capture must not copy to the host)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.is_contiguous(memory_format=torch.channels_last):
            from sidnet.kernels import stem_conv_act_pool

            c = self.layer.conv
            key = (c.weight.data_ptr(), c.weight._version, c.weight.dtype)
            if self._host is None or self._host[0] != key:
                bias = None if c.bias is None else c.bias.detach().float().cpu()
                self._host = (key, c.weight.detach().float().cpu(), bias)
            return stem_conv_act_pool(x, self._host[1], self._host[2], act=self.act, slope=self.slope)
        return F.max_pool2d(self.layer(x), 2, 2)

    @staticmethod
    def fits(layer: nn.Module, pool: nn.Module) -> bool:
        """Whether ``layer`` → ``pool`` is a stem the kernel computes: 3 → K (K % 8 == 0) 3x3/1/1 conv, ReLU, LeakyReLU
        (0 <= slope <= 1) or identity, then a 2x2/2 max-pool."""
        if not (isinstance(layer, ConvBiasAct) and isinstance(pool, nn.MaxPool2d) and _is_2x2(pool)):
            return False
        c, act = layer.conv, layer.act
        act_ok = isinstance(act, (nn.ReLU, nn.Identity)) or (isinstance(act, nn.LeakyReLU)
                                                              and 0.0 <= act.negative_slope <= 1.0)  # fmt: skip
        return (c.in_channels == 3 and c.out_channels % 8 == 0 and tuple(c.kernel_size) == (3, 3)
                and tuple(c.stride) == (1, 1) and tuple(c.padding) == (1, 1) and tuple(c.dilation) == (1, 1)
                and c.groups == 1 and c.padding_mode == "zeros" and act_ok)  # fmt: skip


def fuse_for_inference(model: nn.Module, *, cudnn_relu: bool = False, kernel_pool: bool = False,
                       kernel_stem: bool = False) -> nn.Module:  # fmt: skip
    """A copy of ``model`` in eval mode with every ConvNormAct (BatchNorm norm) replaced by :class:`ConvBiasAct`; with
    ``kernel_pool``, every ``MaxPool2d(2, 2)`` by :class:`MaxPool2x2`; with ``kernel_stem``, a 3-channel 3x3 conv
    directly followed by a 2x2 max-pool (Darknet-19's first two layers) by :class:`StemConvActPool`. Both kernel options
    need the built kernels library at run time."""
    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ConvNormAct) and isinstance(child[1], nn.BatchNorm2d):
                conv, bn, act = child[0], child[1], child[2]
                setattr(parent, name, ConvBiasAct(fuse_conv_bn_eval(conv, bn), act, cudnn_relu=cudnn_relu))
    if kernel_stem:
        for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
            for i in range(len(seq) - 1):
                if StemConvActPool.fits(seq[i], seq[i + 1]):
                    seq[i], seq[i + 1] = StemConvActPool(seq[i]), nn.Identity()
    if kernel_pool:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.MaxPool2d) and _is_2x2(child):
                    setattr(parent, name, MaxPool2x2())
    return model


def _is_2x2(m: nn.MaxPool2d) -> bool:
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    return (pair(m.kernel_size) == (2, 2) and pair(m.stride) == (2, 2) and pair(m.padding) == (0, 0)
            and pair(m.dilation) == (1, 1) and not m.ceil_mode)  # fmt: skip
