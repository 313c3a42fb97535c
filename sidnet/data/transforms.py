"""Letterbox (shared by train, eval and deployment) and the albumentations train pipeline.

Pipeline contract: the dataset always letterboxes first (:func:`letterbox`, one implementation for every path),
then applies the train ``A.Compose`` to the ``size x size`` image, so scale/translate/crop act at network scale
and ``LetterboxInfo`` stays exact for mapping eval detections back to the original image.
"""

from __future__ import annotations

import os

# albumentations phones home for a version check on import unless told not to; training machines are offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402  (albumentations depends on opencv-python-headless, so cv2 is always there)

from sidnet.letterbox import LETTERBOX_FILL, LetterboxInfo, letterbox, unletterbox_boxes  # noqa: E402

__all__ = ["LETTERBOX_FILL", "LetterboxInfo", "build_train_transform", "letterbox", "unletterbox_boxes"]


def build_train_transform(
    *,
    size: int,
    enabled: bool = True,
    flip_p: float = 0.5,
    scale: tuple[float, float] = (0.5, 1.5),
    translate: float = 0.1,
    brightness: float = 0.3,
    contrast: float = 0.3,
    hue: float = 0.015,
    saturation: float = 0.25,
    value: float = 0.1,
    blur_p: float = 0.1,
    noise_p: float = 0.1,
    gray_p: float = 0.05,
    lowlight_p: float = 0.1,
    min_visibility: float = 0.3,
    masks: bool = False,
) -> A.Compose | None:
    """Bbox-aware train augmentation for images already letterboxed to ``size x size`` (see module docstring).

    Call as ``t(image=uint8 (S, S, 3) RGB, bboxes=(K, 4) xyxy px, labels=(K,))``; boxes leave clipped to the
    image, and boxes less than ``min_visibility`` visible are dropped together with their labels.

    Args:
        size: network input size; scales the blur kernel (a fixed pixel blur means less at higher resolution).
        enabled: ``False`` (``conf/aug/none.yaml``) returns ``None``: the dataset's letterbox-only path.
        flip_p: horizontal flip probability.
        scale, translate: uniform zoom range (aspect kept) and max shift as a fraction of ``size`` per axis;
            the affine is always applied since its ranges contain the identity. Exposed area is filled grey.
        brightness, contrast: ``RandomBrightnessContrast`` limits (fractions), always applied.
        hue: max hue shift as a fraction of the hue circle; saturation, value: max additive shift as a fraction
            of the 0..255 range (albumentations shifts uint8 HSV additively, in OpenCV's 0..179 hue units).
        blur_p: Gaussian or motion blur; noise_p: Gaussian sensor noise; gray_p: grayscale (IR/CCTV footage).
        lowlight_p: darken with gamma 1.5..3 plus noise, a cheap stand-in for night/indoor surveillance frames.
        min_visibility: fraction of a box's area that must stay in the image for the box to be kept.
        masks: also take ``masks=[(S, S) uint8, ...]`` and ``indices=(K,)`` (box k's row in ``masks``): masks move
            with the image (nearest neighbour), ``indices`` says which boxes survived.

    Returns:
        The ``A.Compose``, or ``None`` when disabled or every augmentation is switched off.
    """
    if not enabled:
        return None
    blur_max = max(3, (size // 80) | 1)  # odd kernel: 5 px at 416, 9 px at 640
    ops: list = []
    if flip_p > 0:
        ops.append(A.HorizontalFlip(p=flip_p))
    if tuple(scale) != (1.0, 1.0) or translate > 0:
        ops.append(
            A.Affine(
                scale=tuple(scale),
                keep_ratio=True,
                translate_percent={"x": (-translate, translate), "y": (-translate, translate)},
                border_mode=cv2.BORDER_CONSTANT,
                fill=LETTERBOX_FILL,
                p=1.0,
            )
        )
    if brightness > 0 or contrast > 0:
        ops.append(A.RandomBrightnessContrast(brightness_limit=brightness, contrast_limit=contrast, p=1.0))
    if hue > 0 or saturation > 0 or value > 0:
        ops.append(
            A.HueSaturationValue(
                hue_shift_limit=hue * 180, sat_shift_limit=saturation * 255, val_shift_limit=value * 255, p=1.0
            )
        )
    if lowlight_p > 0:
        ops.append(
            A.Sequential(
                [A.RandomGamma(gamma_limit=(150, 300), p=1.0), A.GaussNoise(std_range=(0.02, 0.06), p=1.0)],
                p=lowlight_p,
            )
        )
    if gray_p > 0:
        ops.append(A.ToGray(num_output_channels=3, p=gray_p))
    if blur_p > 0:
        ops.append(
            A.OneOf(
                [A.GaussianBlur(blur_limit=(3, blur_max), p=1.0), A.MotionBlur(blur_limit=(3, blur_max), p=1.0)],
                p=blur_p,
            )
        )
    if noise_p > 0:
        ops.append(A.GaussNoise(std_range=(0.02, 0.08), p=noise_p))
    if not ops:
        return None
    fields = ["labels", "indices"] if masks else ["labels"]
    bbox_params = A.BboxParams(format="pascal_voc", label_fields=fields, min_visibility=min_visibility, clip=True)
    return A.Compose(ops, bbox_params=bbox_params)
