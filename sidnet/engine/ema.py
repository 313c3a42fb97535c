"""Exponential moving average of weights with a ramped decay (YOLOv5 ``ModelEMA``)."""

from __future__ import annotations

import copy
import itertools
import math

import torch
from torch import nn


class ModelEMA:
    """``update(model)`` after each optimizer step; ``module`` is the averaged copy used for eval and export.

    The decay ramps as ``decay·(1 − exp(−updates / warmup))`` so early, fast-changing weights are not frozen in.
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.9998, warmup: int = 200) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.warmup))
        # The two models have one structure (a deep copy), so their parameters and buffers pair up in order; walking
        # them is much cheaper on the host than two state_dict() calls (a dict and a detach per tensor, ~970 ops for
        # SIDNet-MobileNetV2 every step).
        ema, new, counters, counts = [], [], [], []
        mine = itertools.chain(self.module.parameters(), self.module.buffers())
        theirs = itertools.chain(model.parameters(), model.buffers())
        for v, w in zip(mine, theirs, strict=True):
            if v.dtype.is_floating_point:
                ema.append(v)
                new.append(w)  # no_grad: no detach needed
            else:  # BatchNorm's num_batches_tracked: copied
                counters.append(v)
                counts.append(w)
        # Multi-tensor kernels on CUDA: a few launches per step instead of one or two per tensor (~630 for
        # SIDNet-MobileNetV2: 285 float tensors, 56 counters). lerp: ema + (1 − d)·(new − ema) = d·ema + (1 − d)·new.
        if ema:
            torch._foreach_lerp_(ema, new, 1 - d)
        if counters:
            torch._foreach_copy_(counters, counts)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]
