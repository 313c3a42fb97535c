"""Anchor tuning for YOLOv2-style detectors: IoU k-means plus optional evolutionary refinement.

Follows Darknet's ``calc_anchors`` (k-means with distance ``1 - IoU`` on box sizes, cluster centres are means) and
YOLOv5's autoanchor (multiplicative mutation of the anchors, keeping only improvements). All sizes are ``(w, h)``
pairs in pixels at the network input (after letterboxing), never grid units.

Metrics (see :func:`anchor_metrics`):

- *avg IoU*: mean over boxes of the best IoU between the box and any anchor, both centred at the same point. This is
  the quantity k-means with ``1 - IoU`` minimises and what the YOLOv2 paper reports ("Avg IOU").
- *BPR* (best possible recall): fraction of boxes whose best anchor IoU is ``>= iou_threshold``. YOLOv2 assigns each
  box to its best-IoU anchor whatever that IoU is, so a low-IoU assignment is still trained, but the offset the head
  must learn (``exp(tw)``, ``exp(th)``) is large and such boxes are recalled poorly. YOLOv5 counts a box as coverable
  when some anchor is within a 4x size ratio; in IoU terms we use 0.5 as the default (the usual "this prior fits the
  box" threshold) and the entry script also reports the loose 0.25 level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "YOLOV2_VOC_ANCHORS",
    "anchor_metrics",
    "evolve_anchors",
    "kmeans_anchors",
    "letterboxed_wh",
    "wh_iou",
]

# Darknet yolov2-voc.cfg anchors in grid units of the stride-32 output, converted to input pixels.
YOLOV2_VOC_ANCHORS: np.ndarray = (
    np.array(
        [[1.3221, 1.73145], [3.19275, 4.00944], [5.05587, 8.09892], [9.47112, 4.84053], [11.2364, 10.0071]],
        dtype=np.float64,
    )
    * 32.0
)


def _as_wh(array: np.ndarray, name: str, *, positive: bool) -> np.ndarray:
    """Validate a ``(N, 2)`` size array and return it as float64."""
    wh = np.asarray(array, dtype=np.float64)
    if wh.ndim != 2 or wh.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2), got {wh.shape}")
    if not np.isfinite(wh).all():
        raise ValueError(f"{name} contains NaN or inf")
    if positive and (wh <= 0).any():
        raise ValueError(f"{name} must be strictly positive; drop degenerate boxes first")
    if (wh < 0).any():
        raise ValueError(f"{name} must be non-negative")
    return wh


def letterboxed_wh(widths_heights: np.ndarray, image_sizes: np.ndarray, *, size: int) -> np.ndarray:
    """Scale box sizes from original-image pixels to the letterboxed network input.

    Letterboxing resizes the image so its long side equals ``size`` (aspect ratio kept, then padded), so every box of
    an image is scaled by ``size / max(image_w, image_h)``.

    Args:
        widths_heights: ``(K, 2)`` box ``(w, h)`` in original-image pixels.
        image_sizes: ``(K, 2)`` ``(w, h)`` of the image each box belongs to.
        size: square network input size in pixels (e.g. 416).

    Returns:
        ``(K, 2)`` float64 box sizes in network-input pixels.
    """
    wh = _as_wh(widths_heights, "widths_heights", positive=False)
    sizes = _as_wh(image_sizes, "image_sizes", positive=True)
    if len(wh) != len(sizes):
        raise ValueError(f"widths_heights has {len(wh)} rows but image_sizes has {len(sizes)}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    scale = size / sizes.max(axis=1, keepdims=True)
    return wh * scale


def wh_iou(wh1: np.ndarray, wh2: np.ndarray) -> np.ndarray:
    """IoU of boxes given only by size, as if every box were centred at the same point.

    Args:
        wh1: ``(N, 2)`` non-negative ``(w, h)``.
        wh2: ``(M, 2)`` non-negative ``(w, h)``.

    Returns:
        ``(N, M)`` float64 IoU; a pair of two zero-area boxes gets 0.
    """
    a = _as_wh(wh1, "wh1", positive=False)[:, None, :]
    b = _as_wh(wh2, "wh2", positive=False)[None, :, :]
    inter = np.minimum(a, b).prod(axis=2)
    union = a.prod(axis=2) + b.prod(axis=2) - inter
    # Zero union only happens for two zero-area boxes; call that no overlap instead of dividing by zero.
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def anchor_metrics(wh: np.ndarray, anchors: np.ndarray, *, iou_threshold: float = 0.5) -> dict[str, float | int]:
    """How well ``anchors`` fit the box sizes ``wh`` (see the module docstring for the definitions).

    Args:
        wh: ``(N, 2)`` box sizes, same units as ``anchors`` (network-input pixels).
        anchors: ``(A, 2)`` positive anchor sizes.
        iou_threshold: a box counts towards BPR when its best anchor IoU is ``>=`` this.

    Returns:
        ``{"avg_iou": mean best IoU, "bpr": fraction of boxes with best IoU >= iou_threshold,
        "iou_threshold": iou_threshold, "num_boxes": N}``.
    """
    wh = _as_wh(wh, "wh", positive=False)
    anchors = _as_wh(anchors, "anchors", positive=True)
    if len(wh) == 0:
        raise ValueError("anchor_metrics needs at least one box")
    best = wh_iou(wh, anchors).max(axis=1)
    return {
        "avg_iou": float(best.mean()),
        "bpr": float((best >= iou_threshold).mean()),
        "iou_threshold": float(iou_threshold),
        "num_boxes": len(wh),
    }


def _fitness(wh: np.ndarray, anchors: np.ndarray) -> float:
    """Mean best IoU: the objective shared by k-means restarts and evolution."""
    return float(wh_iou(wh, anchors).max(axis=1).mean())


def _sort_by_area(anchors: np.ndarray) -> np.ndarray:
    return anchors[np.argsort(anchors.prod(axis=1), kind="stable")]


def _kmeanspp_init(wh: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding under the ``1 - IoU`` distance."""
    centres = [wh[rng.integers(len(wh))]]
    for _ in range(1, k):
        dist = 1.0 - wh_iou(wh, np.stack(centres)).max(axis=1)
        weights = dist**2
        total = weights.sum()
        # All boxes already coincide with a centre (fewer distinct sizes than k): any box is as good as another.
        index = rng.integers(len(wh)) if total <= 0 else rng.choice(len(wh), p=weights / total)
        centres.append(wh[index])
    return np.stack(centres).copy()


def _kmeans_once(wh: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """One Lloyd run: assign by best IoU, move each centre to the mean of its boxes (as Darknet does)."""
    centres = _kmeanspp_init(wh, k, rng)
    assignment = np.full(len(wh), -1)
    for _ in range(iters):
        iou = wh_iou(wh, centres)
        new_assignment = iou.argmax(axis=1)
        if np.array_equal(new_assignment, assignment):
            break
        assignment = new_assignment
        for j in range(k):
            members = wh[assignment == j]
            if len(members):
                centres[j] = members.mean(axis=0)
            else:
                # An empty cluster wastes an anchor; move it onto the worst-fitted box instead.
                centres[j] = wh[iou.max(axis=1).argmin()]
    return centres


def evolve_anchors(
    wh: np.ndarray,
    anchors: np.ndarray,
    *,
    generations: int = 1000,
    seed: int = 0,
    mutation_prob: float = 0.9,
    sigma: float = 0.1,
    min_size: float = 2.0,
) -> np.ndarray:
    """Refine anchors by random multiplicative mutation, keeping a mutant only if it raises the mean best IoU.

    YOLOv5 autoanchor's scheme: each coordinate is mutated with probability ``mutation_prob`` by a factor
    ``1 + r * N(0, sigma)`` (``r ~ U(0, 1)`` once per generation), clipped to ``[0.3, 3]``. Fitness never decreases.

    Args:
        wh: ``(N, 2)`` positive box sizes in network-input pixels.
        anchors: ``(A, 2)`` positive starting anchors.
        generations: number of mutation attempts; 0 returns the input (sorted by area).
        seed: seed for ``np.random.default_rng``.
        mutation_prob: per-coordinate probability of being mutated.
        sigma: standard deviation of the multiplicative noise.
        min_size: lower bound on anchor sides in pixels, so a mutation cannot produce a degenerate anchor.

    Returns:
        ``(A, 2)`` float64 anchors sorted by area.
    """
    wh = _as_wh(wh, "wh", positive=True)
    best = _as_wh(anchors, "anchors", positive=True).copy()
    rng = np.random.default_rng(seed)
    best_fitness = _fitness(wh, best)
    for _ in range(generations):
        factor = np.ones_like(best)
        # A generation where nothing mutated would only waste an evaluation.
        while (factor == 1).all():
            mask = rng.random(best.shape) < mutation_prob
            factor = (mask * rng.random() * rng.standard_normal(best.shape) * sigma + 1).clip(0.3, 3.0)
        candidate = np.maximum(best * factor, min_size)
        fitness = _fitness(wh, candidate)
        if fitness > best_fitness:
            best, best_fitness = candidate, fitness
    return _sort_by_area(best)


def kmeans_anchors(
    wh: np.ndarray,
    *,
    k: int = 3,
    seed: int = 0,
    iters: int = 300,
    restarts: int = 10,
    evolve_generations: int = 0,
    evolve_mutation_prob: float = 0.9,
    evolve_sigma: float = 0.1,
) -> np.ndarray:
    """Cluster box sizes into ``k`` anchors with distance ``1 - IoU``, optionally refined by :func:`evolve_anchors`.

    Each of ``restarts`` runs starts from a k-means++ seeding; the run with the highest mean best IoU wins.
    Deterministic for a given ``seed`` (only ``np.random.default_rng(seed)`` is used).

    Args:
        wh: ``(N, 2)`` positive box sizes in network-input pixels (see :func:`letterboxed_wh`).
        k: number of anchors; must not exceed ``N``.
        seed: random seed.
        iters: maximum Lloyd iterations per restart (stops earlier when assignments settle).
        restarts: number of independent k-means runs.
        evolve_generations: generations of evolutionary refinement after k-means (0 = none).
        evolve_mutation_prob: see :func:`evolve_anchors` ``mutation_prob``.
        evolve_sigma: see :func:`evolve_anchors` ``sigma``.

    Returns:
        ``(k, 2)`` float64 anchors ``(w, h)`` sorted by ascending area.
    """
    wh = _as_wh(wh, "wh", positive=True)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > len(wh):
        raise ValueError(f"k={k} anchors requested but only {len(wh)} boxes are available; lower k or add data")
    if restarts < 1 or iters < 1:
        raise ValueError(f"restarts and iters must be >= 1, got restarts={restarts}, iters={iters}")
    rng = np.random.default_rng(seed)
    best, best_fitness = None, -1.0
    for _ in range(restarts):
        centres = _kmeans_once(wh, k, iters, rng)
        fitness = _fitness(wh, centres)
        if fitness > best_fitness:
            best, best_fitness = centres, fitness
    assert best is not None
    if evolve_generations > 0:
        # YOLOv5 floors anchors at 2 px; go below that only when the data itself has smaller boxes.
        min_size = min(2.0, float(wh.min()))
        best = evolve_anchors(
            wh,
            best,
            generations=evolve_generations,
            seed=seed,
            mutation_prob=evolve_mutation_prob,
            sigma=evolve_sigma,
            min_size=min_size,
        )
    return _sort_by_area(best)


def load_anchors(anchors: Any, *, project_root: Path) -> list[list[float]]:
    """A list of [w, h], or a YAML path (relative to the project root) holding ``anchors:``."""
    if isinstance(anchors, (list, tuple)):
        return [[float(w), float(h)] for w, h in anchors]
    from sidnet.safety import load_yaml

    path = Path(anchors)
    path = path if path.is_absolute() else project_root / path
    if not path.exists():
        raise FileNotFoundError(f"anchors file not found: {path}; run `python -m train.anchors` or set model.anchors")
    data = load_yaml(path, what="anchors file", fix="regenerate it with `python -m train.anchors`")
    if not isinstance(data, dict) or "anchors" not in data:
        raise ValueError(f"{path} has no 'anchors:' list; regenerate it with `python -m train.anchors`")
    try:
        return [[float(w), float(h)] for w, h in data["anchors"]]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: 'anchors' must be a list of [w, h] numbers ({e}); regenerate it with "
                         "`python -m train.anchors`") from e  # fmt: skip
