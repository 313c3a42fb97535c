"""The train augmentation as batch operations on the device (``loader.gpu_aug``): one sample's parameters are drawn on
the CPU from its own seed (:func:`sample_params`, in the loader worker, which also moves the boxes), the pixels are
transformed for the whole batch at once on the GPU (:func:`apply`).

It reproduces the albumentations pipeline of :func:`sidnet.data.build_train_transform` op for op, with the same
keyword arguments and defaults (read from its signature) and the same order: horizontal flip, scale/translate about
the centre (grey fill), brightness/contrast, hue/saturation/value shifts, low light (gamma + noise), grayscale,
Gaussian or motion blur, Gaussian noise. It differs in arithmetic, not in distribution: float32 throughout instead of
uint8 with a rounding after each op, bilinear ``grid_sample`` instead of OpenCV's ``warpAffine``, noise from the
device's generator. So a ``gpu_aug`` run is deterministic under ``(seed, epoch)`` like the CPU path, but its pixels
are not the CPU path's.

Parameter vector per sample (float32, :data:`COLUMNS`): flip (0/1), scale, tx, ty (pixels), contrast multiplier,
brightness offset (fraction of full scale), hue shift (fraction of the circle), saturation and value shifts
(fractions), gamma (1: no low light), low-light noise std, gray (0/1), blur kind (0 none, 1 Gaussian, 2 motion),
blur kernel size, blur sigma or motion angle (degrees), noise std.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sidnet.letterbox import LETTERBOX_FILL

COLUMNS = ("flip", "scale", "tx", "ty", "contrast", "brightness", "hue", "saturation", "value", "gamma",
           "lowlight_std", "gray", "blur_kind", "blur_k", "blur_param", "noise_std")  # fmt: skip
_COL = {name: i for i, name in enumerate(COLUMNS)}
_NOT_PIXEL_OPS = {"size", "enabled", "masks", "mosaic", "multiscale"}  # multiscale: the trainer's batch resize


def params_from_aug_config(aug: dict[str, Any], *, size: int) -> dict[str, Any]:
    """The run's ``aug`` keywords completed with :func:`build_train_transform`'s defaults (one source of truth),
    plus ``size`` and ``blur_max`` (derived from it as there). ``TypeError`` on a keyword the transform lacks."""
    from sidnet.data import build_train_transform

    defaults = {k: p.default for k, p in inspect.signature(build_train_transform).parameters.items()
                if k not in _NOT_PIXEL_OPS}  # fmt: skip
    unknown = set(aug) - set(defaults) - _NOT_PIXEL_OPS
    if unknown:
        raise TypeError(f"loader.gpu_aug does not implement aug.{sorted(unknown)[0]}; set loader.gpu_aug=false")
    cfg = {**defaults, **{k: v for k, v in aug.items() if k in defaults}}
    cfg["scale"] = tuple(float(v) for v in cfg["scale"])
    cfg["blur_max"] = max(3, (size // 80) | 1)
    cfg["size"] = size
    return cfg


def sample_params(rng: np.random.Generator, **cfg: Any) -> tuple[np.ndarray, int]:
    """One sample's parameter vector (:data:`COLUMNS`) and its noise seed, drawn from ``rng`` alone."""
    p = np.zeros(len(COLUMNS), dtype=np.float32)
    p[_COL["flip"]] = rng.random() < cfg["flip_p"]
    p[_COL["scale"]] = rng.uniform(*cfg["scale"])
    t = cfg["translate"]
    p[_COL["tx"]], p[_COL["ty"]] = rng.uniform(-t, t, size=2) * cfg["size"]
    p[_COL["contrast"]] = 1 + rng.uniform(-cfg["contrast"], cfg["contrast"])
    p[_COL["brightness"]] = rng.uniform(-cfg["brightness"], cfg["brightness"])
    p[_COL["hue"]] = rng.uniform(-cfg["hue"], cfg["hue"])
    p[_COL["saturation"]] = rng.uniform(-cfg["saturation"], cfg["saturation"])
    p[_COL["value"]] = rng.uniform(-cfg["value"], cfg["value"])
    p[_COL["gamma"]] = 1.0
    if rng.random() < cfg["lowlight_p"]:
        p[_COL["gamma"]] = rng.uniform(1.5, 3.0)
        p[_COL["lowlight_std"]] = rng.uniform(0.02, 0.06)
    p[_COL["gray"]] = rng.random() < cfg["gray_p"]
    if rng.random() < cfg["blur_p"]:
        kind = 1 + int(rng.random() < 0.5)
        p[_COL["blur_kind"]] = kind
        p[_COL["blur_k"]] = 2 * int(rng.integers(1, cfg["blur_max"] // 2 + 1)) + 1  # odd, 3..blur_max
        p[_COL["blur_param"]] = rng.uniform(0.5, 3.0) if kind == 1 else rng.uniform(0.0, 180.0)
    if rng.random() < cfg["noise_p"]:
        p[_COL["noise_std"]] = rng.uniform(0.02, 0.08)
    return p, int(rng.integers(0, 2**62))


def move_boxes(
    boxes: np.ndarray, params: np.ndarray, *, size: int, min_visibility: float
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the sample's flip + scale/translate to ``(K, 4)`` xyxy boxes (network pixels), clip them to the image,
    drop those with less than ``min_visibility`` of their area left. Returns the kept boxes and the keep mask."""
    flip, s, tx, ty = (float(params[_COL[k]]) for k in ("flip", "scale", "tx", "ty"))
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    x1, x2 = (size - b[:, 2], size - b[:, 0]) if flip else (b[:, 0], b[:, 2])
    c = size / 2
    moved = np.stack([s * (x1 - c) + c + tx, s * (b[:, 1] - c) + c + ty,
                      s * (x2 - c) + c + tx, s * (b[:, 3] - c) + c + ty], axis=1).astype(np.float32)  # fmt: skip
    clipped = moved.clip(0, size)
    area = lambda a: (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)  # noqa: E731
    full = area(moved)
    keep = (full > 0) & (area(clipped) >= min_visibility * full) & (area(clipped) > 0)
    return clipped[keep], keep


def apply(images: torch.Tensor, params: torch.Tensor, *, seeds: list[int]) -> torch.Tensor:
    """Augment float ``(N, 3, S, S)`` images in ``[0, 1]`` with per-sample ``params`` ``(N, len(COLUMNS))`` and noise
    ``seeds``; returns a new float tensor in ``[0, 1]``. ``params`` may stay on the host (as the loader hands them
    over): which samples get a blur or noise is then decided there, without waiting for the device."""
    host = params.cpu() if params.device.type == "cpu" else None
    params = params.to(images.device, non_blocking=True)
    host = host if host is not None else params.cpu()
    n, _, size, _ = images.shape
    col = lambda name: params[:, _COL[name]]  # noqa: E731
    fill = LETTERBOX_FILL / 255.0
    # Flip + scale/translate about the centre: grid_sample reads the inverse map (normalised coordinates).
    f = 1.0 - 2.0 * col("flip")
    s = col("scale")
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = f / s
    theta[:, 0, 2] = -f * 2 * col("tx") / (size * s)
    theta[:, 1, 1] = 1.0 / s
    theta[:, 1, 2] = -2 * col("ty") / (size * s)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    x = F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    view = lambda name: col(name).view(n, 1, 1, 1)  # noqa: E731
    x = (x * view("contrast") + view("brightness")).clamp_(0, 1)
    x = _shift_hsv(x, view("hue"), view("saturation"), view("value"))
    x = torch.where(view("gamma") != 1, x.clamp(min=1e-8) ** view("gamma"), x)
    red, green, blue = x.unbind(1)  # scalar weights: a weight tensor made from a list is a blocking copy to the device
    gray = (0.299 * red + 0.587 * green + 0.114 * blue)[:, None].expand_as(x)
    x = torch.where(view("gray") > 0, gray, x)
    host = host.numpy()  # per-sample reads below: numpy scalars, not a tensor op each
    hcol = lambda name: host[:, _COL[name]]  # noqa: E731
    for i in np.flatnonzero(hcol("blur_kind") > 0).tolist():
        x[i] = _blur(x[i], kind=int(host[i, _COL["blur_kind"]]), k=int(host[i, _COL["blur_k"]]),
                     param=float(host[i, _COL["blur_param"]]))  # fmt: skip
    stds = (hcol("lowlight_std") > 0) | (hcol("noise_std") > 0)
    for i in np.flatnonzero(stds).tolist():
        g = torch.Generator(device=x.device).manual_seed(seeds[i])
        for name in ("lowlight_std", "noise_std"):  # the CPU order: low-light noise, then (after blur) sensor noise
            std = float(host[i, _COL[name]])
            if std > 0:
                x[i] = x[i] + std * torch.randn(x[i].shape, generator=g, device=x.device, dtype=x.dtype)
    return x.clamp_(0, 1)


def compose(source: torch.Tensor, index: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """The images of a ``loader.cache=device`` batch: float ``(N, 3, S, S)`` in ``[0, 1]`` on ``source``'s device,
    gathered from ``source`` (uint8 ``(M, S, S, 3)``, the cached letterboxed images) by ``index`` (int64 ``(N, 4)``:
    ``[j, -1, -1, -1]`` for image ``j``, four tiles for a mosaic) with ``layout`` (``(N, 5)``: a mosaic's ``xc, yc,
    crop, cx0, cy0``, as :class:`sidnet.data.dataset.MosaicLayout`). ``index`` and ``layout`` as the loader hands them
    (on the host): the mosaic rows are picked there, without waiting for the device."""
    rows = (index[:, 1] >= 0).nonzero().flatten()
    index = index.to(source.device, non_blocking=True)
    images = source[index[:, 0]].permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    if len(rows):
        rows = rows.to(source.device, non_blocking=True)
        images[rows] = _mosaic(source, index[rows], layout.to(source.device, non_blocking=True)[rows].float())
    return images


def _mosaic(source: torch.Tensor, tiles: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """Four tiles around ``(xc, yc)`` on a grey ``2S × 2S`` canvas (one gather), then the square crop at ``(cx0,
    cy0)`` resized to ``S`` (one bilinear ``grid_sample``, OpenCV's half-pixel centres)."""
    m, s = tiles.shape[0], source.shape[1]
    xc, yc, crop, cx0, cy0 = layout.unbind(1)
    t = torch.arange(2 * s, device=source.device, dtype=layout.dtype)[None]
    right, below = t >= xc[:, None], t >= yc[:, None]  # (m, 2S): columns / rows of the right / lower tiles
    sx = (t - torch.where(right, xc[:, None], xc[:, None] - s)).long()
    sy = (t - torch.where(below, yc[:, None], yc[:, None] - s)).long()
    tile = right[:, None, :].long() + 2 * below[:, :, None].long()  # (m, 2S, 2S): 0 TL, 1 TR, 2 BL, 3 BR
    image = tiles.gather(1, tile.view(m, -1)).view(m, 2 * s, 2 * s)
    flat = (image * s + sy.clamp(0, s - 1)[:, :, None]) * s + sx.clamp(0, s - 1)[:, None, :]
    inside = ((sy >= 0) & (sy < s))[:, :, None] & ((sx >= 0) & (sx < s))[:, None, :]
    canvas = torch.where(inside[..., None], source.view(-1, 3)[flat], LETTERBOX_FILL)
    canvas = canvas.permute(0, 3, 1, 2).float().div_(255.0)
    w = 2 * s
    theta = torch.zeros(m, 2, 3, device=source.device, dtype=torch.float32)
    theta[:, 0, 0] = theta[:, 1, 1] = crop / w
    theta[:, 0, 2] = (2 * cx0 + crop) / w - 1
    theta[:, 1, 2] = (2 * cy0 + crop) / w - 1
    grid = F.affine_grid(theta, [m, 3, s, s], align_corners=False)
    return F.grid_sample(canvas, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _shift_hsv(x: torch.Tensor, dh: torch.Tensor, ds: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """Additive hue (fraction of the circle), saturation and value shifts, as albumentations on OpenCV's HSV."""
    r, g, b = x.unbind(1)
    v, _ = x.max(1)
    c = v - x.min(1)[0]
    safe = c.clamp(min=1e-8)
    h = torch.where(v == r, ((g - b) / safe) % 6, torch.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(c > 0, h / 6, torch.zeros_like(h))
    sat = torch.where(v > 0, c / v.clamp(min=1e-8), torch.zeros_like(v))
    h = (h + dh[:, 0]) % 1.0
    sat = (sat + ds[:, 0]).clamp(0, 1)
    v = (v + dv[:, 0]).clamp(0, 1)
    k = lambda m: (m + h * 6) % 6  # noqa: E731
    chan = lambda m: v - v * sat * (torch.minimum(k(m), 4 - k(m)).clamp(0, 1))  # noqa: E731
    return torch.stack([chan(5), chan(3), chan(1)], 1)


def _blur(img: torch.Tensor, *, kind: int, k: int, param: float) -> torch.Tensor:
    """One ``(3, S, S)`` image through a Gaussian (sigma ``param``) or motion (angle ``param``°) ``k × k`` kernel,
    borders reflected as OpenCV's default."""
    r = k // 2
    t = torch.arange(k, device=img.device, dtype=img.dtype) - r
    if kind == 1:
        g1 = torch.exp(-(t**2) / (2 * param**2))
        kernel = g1[:, None] * g1[None, :]
    else:
        a = math.radians(param)
        yy, xx = torch.meshgrid(t, t, indexing="ij")
        dist = (xx * math.sin(a) - yy * math.cos(a)).abs()  # distance from the line through the centre
        kernel = (dist <= 0.5).to(img.dtype)
    kernel = (kernel / kernel.sum()).expand(3, 1, k, k)
    padded = F.pad(img[None], (r, r, r, r), mode="reflect")
    return F.conv2d(padded, kernel, groups=3)[0]
