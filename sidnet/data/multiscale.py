"""Multi-scale training (YOLOv2's, YOLOv5's ``--multi-scale``): each batch is resized to an input size drawn from a
range, so the network sees people at more scales than augmentation of single images gives (small, distant persons
especially). The size of batch ``index`` of epoch ``epoch`` depends on ``(seed, epoch, index)`` alone, which keeps
resume exact and every data-parallel rank at the same size."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

STRIDE = 32  # the network downsamples by 32: every input size is a multiple of it


def multiscale_size(*, seed: int, epoch: int, index: int, low: int, high: int) -> int:
    """A multiple of 32 in ``[low, high]``, uniform over those multiples, from ``(seed, epoch, index)``."""
    sizes = np.arange(-(-int(low) // STRIDE) * STRIDE, int(high) + 1, STRIDE)
    if not len(sizes):
        raise ValueError(f"multiscale range [{low}, {high}] holds no multiple of {STRIDE}")
    rng = np.random.default_rng([int(seed), int(epoch), int(index), 0x5CA1E])
    return int(sizes[rng.integers(len(sizes))])


def rescale_batch(
    images: torch.Tensor, targets: list[dict[str, Any]], *, size: int
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """``images`` (N, 3, S, S) → (N, 3, size, size) (bilinear) and the targets' ``boxes`` (xyxy, input pixels)
    scaled by ``size / S``; other target keys are passed through. ``size == S`` returns the inputs unchanged."""
    s = images.shape[-1]
    if size == s:
        return images, targets
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    k = size / s
    return images, [{**t, "boxes": t["boxes"] * k} for t in targets]
