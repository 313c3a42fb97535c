"""The YOLOv2-family detector: normalize → backbone → passthrough (reorg) head → raw map; decode separately."""

from __future__ import annotations

import torch
from torch import nn

from sidnet.models.layers import ConvNormAct, LayerFactory, Reorg
from sidnet.models.region import RegionDecode


class Normalize(nn.Module):
    """(x - mean) / std per channel; inside the model so every runtime feeds the same [0, 1] RGB input."""

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.identity = mean == (0.0, 0.0, 0.0) and std == (1.0, 1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Darknet models take [0, 1] as is: skipping the no-op keeps it out of the exported graph.
        return x if self.identity else (x - self.mean) / self.std


class PassthroughHead(nn.Module):
    """YOLOv2 head: two 3x3 convs on c32, a 1x1 squeeze of c16 reorganised to stride 32, concat, 3x3, 1x1 out.

    ``forward(c16, c32)`` → raw (N, A·(5+C), H/32, W/32). Concat order follows Darknet's route [-1, -4]:
    the reorganised passthrough first, then the deep features.
    """

    def __init__(
        self,
        in_channels: tuple[int, int],
        *,
        num_outputs: int,
        channels: int = 1024,
        passthrough_channels: int = 64,
        reorg_stride: int = 2,
        act_layer: LayerFactory = nn.ReLU,
        norm_layer: LayerFactory = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        c16, c32 = in_channels
        kw = dict(act_layer=act_layer, norm_layer=norm_layer)
        self.deep = nn.Sequential(ConvNormAct(c32, channels, 3, **kw), ConvNormAct(channels, channels, 3, **kw))
        self.passthrough = ConvNormAct(c16, passthrough_channels, 1, **kw)
        self.reorg = Reorg(reorg_stride)
        self.fuse = ConvNormAct(passthrough_channels * reorg_stride**2 + channels, channels, 3, **kw)
        self.out = nn.Conv2d(channels, num_outputs, 1)

    def forward(self, c16: torch.Tensor, c32: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.reorg(self.passthrough(c16)), self.deep(c32)], dim=1)
        return self.out(self.fuse(x))


class YOLOv2(nn.Module):
    """A YOLOv2-family single-scale detector.

    ``forward(images)`` takes float (N, 3, S, S) RGB in [0, 1], letterboxed to ``input_size`` (S a multiple of 32),
    and returns the raw map (N, A·(5+C), S/32, S/32) in train and eval mode alike; ``self.region(raw)`` decodes it
    to (N, A·S²/1024, 5+C) rows (see :mod:`sidnet.models.region`). ``predict(images)`` = ``region(forward(images))``.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        head: nn.Module,
        region: RegionDecode,
        normalize: Normalize,
        input_size: int,
    ) -> None:
        super().__init__()
        if input_size % 32:
            raise ValueError(f"input_size {input_size} is not a multiple of 32; use e.g. 416 or 320")
        self.normalize = normalize
        self.backbone = backbone
        self.head = head
        self.region = region
        self.input_size = input_size

    @property
    def anchors(self) -> torch.Tensor:
        return self.region.anchors

    @property
    def num_classes(self) -> int:
        return self.region.num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c16, c32 = self.backbone(self.normalize(images))
        return self.head(c16, c32)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.region(self(images))
