"""Darknet-19 feature extractor (YOLOv2's backbone), parametrized by activation, norm and width."""

from __future__ import annotations

import torch
from torch import nn

from sidnet.models.layers import ConvNormAct, LayerFactory

# (out_channels, kernel) per conv; "M" = 2x2 max-pool. Stage 5 ends at stride 16 (passthrough source).
_STAGES_TO_16 = [(32, 3), "M", (64, 3), "M", (128, 3), (64, 1), (128, 3), "M", (256, 3), (128, 1), (256, 3), "M",
                 (512, 3), (256, 1), (512, 3), (256, 1), (512, 3)]  # fmt: skip
_STAGES_TO_32 = ["M", (1024, 3), (512, 1), (1024, 3), (512, 1), (1024, 3)]


class Darknet19(nn.Module):
    """Darknet-19 without its classifier.

    ``forward(x (N,3,H,W))`` → ``(c16 (N, 512w, H/16, W/16), c32 (N, 1024w, H/32, W/32))`` where ``w`` is
    ``width``. SIDNet uses ``act_layer=nn.ReLU``; YOLOv2 uses LeakyReLU(0.1).
    """

    def __init__(
        self,
        *,
        width: float = 1.0,
        act_layer: LayerFactory = nn.ReLU,
        norm_layer: LayerFactory = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.stage16, c16 = self._make(_STAGES_TO_16, 3, width, act_layer, norm_layer)
        self.stage32, c32 = self._make(_STAGES_TO_32, c16, width, act_layer, norm_layer)
        self.out_channels = (c16, c32)

    @staticmethod
    def _make(spec: list, in_ch: int, width: float, act_layer: LayerFactory, norm_layer: LayerFactory):
        layers: list[nn.Module] = []
        for item in spec:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            out_ch, k = item
            out_ch = max(8, int(round(out_ch * width)))
            layers.append(ConvNormAct(in_ch, out_ch, k, act_layer=act_layer, norm_layer=norm_layer))
            in_ch = out_ch
        return nn.Sequential(*layers), in_ch

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c16 = self.stage16(x)
        return c16, self.stage32(c16)
