"""The network's training forward and backward replayed as CUDA graphs (``cuda_graph=true``).

At batch 64 a SIDNet-MobileNetV2 step launches ~1,100 small kernels for the network alone and the GPU waits on the
host about half of the step (benchmarks/results/loader/README.md §5). :class:`GraphedForward` captures the forward and
its backward once per input shape with :func:`torch.cuda.make_graphed_callables` and replays them afterwards: two
launches instead of ~1,100. What stays eager: the loss, the optimizer, the EMA, and any batch whose shape has no graph
yet beyond ``max_graphs`` (a partial last batch, a multi-scale size past the cap).

Same numbers as eager: a replay runs the kernels the capture recorded on the same parameter and buffer storage (the
optimizer and the EMA update them in place; ``load_state_dict`` copies into them). The capture's warm-up passes move
BatchNorm's running statistics, so they are saved before and put back after. One process, CUDA only, region models.
A capture holds ``capture_lock`` (the batch prefetcher's, :mod:`sidnet.engine.prefetch`): no other thread may call
into CUDA while a stream captures in the default global mode.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch
from torch import nn

log = logging.getLogger(__name__)


class _Forward(nn.Module):
    """The model's forward as a module of its own: :func:`torch.cuda.make_graphed_callables` replaces the forward of
    the module it is given, and this way the model itself keeps its eager forward (evaluation, other shapes)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


class GraphedForward(nn.Module):
    """``model``'s training forward, replayed from a CUDA graph for each input shape seen (at most ``max_graphs``);
    the model's eval mode and shapes past the cap run it eagerly. Call it where the model would be called (inside the
    task's autocast): a capture opens its own autocast with ``cache_enabled=False``, as CUDA graphs require."""

    def __init__(self, model: nn.Module, *, amp: bool, max_graphs: int = 8, warmup_iters: int = 3,
                 capture_lock: threading.Lock | None = None) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.amp, self.max_graphs, self.warmup_iters = amp, max_graphs, warmup_iters
        self.capture_lock = capture_lock
        self._graphs: dict[tuple, nn.Module] = {}

    @staticmethod
    def _key(images: torch.Tensor) -> tuple:
        return tuple(images.shape), images.dtype, images.stride(), images.device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not (self.model.training and images.is_cuda and torch.is_grad_enabled()):
            return self.model(images)
        key = self._key(images)
        graphed = self._graphs.get(key)
        if graphed is None:
            if len(self._graphs) >= self.max_graphs:
                return self.model(images)
            graphed = self._capture(images)
            self._graphs[key] = graphed
        return graphed(images)

    def _capture(self, images: torch.Tensor) -> nn.Module:
        buffers = list(self.model.buffers())  # BatchNorm's running statistics: the warm-up passes move them
        saved = [b.clone() for b in buffers]  # (the parameters: the warm-up takes gradients, it does not step)
        wrapper = _Forward(self.model)
        # The sample becomes the graph's input buffer (later batches are copied into it): a copy of its own, with the
        # batch's strides (channels_last stays channels_last).
        sample = images.detach().clone()
        with self.capture_lock or contextlib.nullcontext(), \
                torch.autocast("cuda", dtype=torch.float16, enabled=self.amp, cache_enabled=False):
            torch.cuda.make_graphed_callables(wrapper, (sample,), num_warmup_iters=self.warmup_iters,
                                              allow_unused_input=True)  # fmt: skip
        with torch.no_grad():
            for b, v in zip(buffers, saved, strict=True):  # in place: the graph holds these storages
                b.copy_(v)
        log.info("cuda_graph: captured the training forward/backward for input %s (%d graph%s)",
                 "x".join(map(str, images.shape)), len(self._graphs) + 1, "s" if self._graphs else "")  # fmt: skip
        return wrapper

    @property
    def graphs(self) -> int:
        """How many input shapes have a captured graph."""
        return len(self._graphs)
