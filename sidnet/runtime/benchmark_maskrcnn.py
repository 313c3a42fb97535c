"""Mask R-CNN inference speed, side by side in one process: torchvision's eager model (FP32, FP16 autocast, FP16 with
a compiled trunk) against the torch backend's static deploy module (:class:`~sidnet.runtime.backends.torch.
DeployModuleBackend`: FP32 eager, FP32 and FP16 CUDA graphs with the graph NMS and the csrc pyramid RoIAlign).

Images/s per variant and batch from real images (the mask head's cost in torchvision follows the number of
detections, so a trained checkpoint times what a deployment pays; random weights are allowed and labelled). × is
relative to eager FP32 at the same batch. ``agreement`` compares each backend's detections with eager FP32's on the
same images (score ≥ 0.3: matched at IoU ≥ 0.9, their masks' IoU). Used by ``python -m deploy.benchmark --parts
maskrcnn`` and ``benchmarks/maskrcnn.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

MATCH_SCORE, MATCH_IOU = 0.3, 0.9


def load_images(folder: Path, size: int, count: int) -> torch.Tensor:
    """Up to ``count`` images of ``folder`` letterboxed to ``size``: float (N, 3, S, S) in [0, 1] on the CPU."""
    import cv2

    from sidnet.data import letterbox
    from sidnet.data.validate import list_images

    out = []
    for path in list_images(folder)[:count]:
        bgr = cv2.imread(str(path))
        if bgr is None:
            continue
        image, _, _ = letterbox(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), [], size=size)
        out.append(torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    if not out:
        raise FileNotFoundError(f"{folder}: no readable images; pass --maskrcnn-images with a folder of JPEG/PNG files")
    return torch.stack(out)


def rate(fn: Callable[[torch.Tensor], object], batches: list[torch.Tensor], iters: int, *, sync: bool) -> float:
    """Images per second: median of 3 rounds of ``iters`` calls, each on the next batch."""
    with torch.no_grad():
        for b in batches[:3]:
            fn(b)
        if sync:
            torch.cuda.synchronize()
        rates = []
        for _ in range(3):
            t0 = time.perf_counter()
            for i in range(iters):
                fn(batches[i % len(batches)])
            if sync:
                torch.cuda.synchronize()
            rates.append(iters * batches[0].shape[0] / (time.perf_counter() - t0))
    return statistics.median(rates)


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2:] - x[:, :2], 0, None).prod(-1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def agreement(ref: tuple[np.ndarray, ...], other: tuple[np.ndarray, ...], *, min_score: float = MATCH_SCORE) -> dict:
    """How well ``other``'s (dets, num, masks) reproduce ``ref``'s: the share of ref's detections at score ≥
    ``min_score`` that ``other`` has at IoU ≥ 0.9 (greedy by score), and the mean IoU of the matched 28×28 masks
    (thresholded at 0.5)."""
    matched = total = 0
    mask_ious = []
    for i in range(len(ref[1])):
        a = ref[0][i, : int(ref[1][i])]
        b = other[0][i, : int(other[1][i])]
        keep_a = np.nonzero(a[:, 4] >= min_score)[0]
        total += len(keep_a)
        if not len(keep_a) or not len(b):
            continue
        iou = _box_iou(a[keep_a, :4], b[:, :4])
        used = set()
        for row, ia in enumerate(keep_a):
            j = next((j for j in np.argsort(-iou[row]) if j not in used and iou[row, j] >= MATCH_IOU), None)
            if j is None:
                continue
            used.add(j)
            matched += 1
            ma, mb = ref[2][i, ia] > 0.5, other[2][i, j] > 0.5
            union = (ma | mb).sum()
            mask_ious.append(float((ma & mb).sum() / union) if union else 1.0)
    return {"detections": total, "matched": matched / total if total else float("nan"),
            "mask_iou": float(np.mean(mask_ious)) if mask_ious else float("nan")}  # fmt: skip


def maskrcnn_rows(checkpoint: Path, images: torch.Tensor, *, batches: tuple[int, ...] = (1, 8), iters: int = 64,
                  compile_trunk: bool = True, topk: int = 100,
                  on_row: Callable[[dict], None] = lambda row: None) -> dict:  # fmt: skip
    """Every variant at every batch (see the module docstring); ``images`` (N, 3, S, S) at the checkpoint's size.
    ``topk``: the deploy module's detection rows (its mask head runs on all of them). On a CPU: eager FP32 and the
    backend's FP32 eager module only. Returns ``{"rows": [...], "agreement": {...}}``."""
    from sidnet.checkpoint import load_checkpoint, model_from_checkpoint
    from sidnet.runtime.backends.torch import open_backend

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    model = model_from_checkpoint(load_checkpoint(checkpoint)).to(dev).eval()
    rows: list[dict] = []
    base: dict[int, float] = {}

    def add(variant: str, bs: int, img_s: float, **extra) -> None:
        if variant == "eager FP32":
            base[bs] = img_s
        row = {"variant": variant, "batch": bs, "img_s": img_s, "x_eager_fp32": img_s / base[bs], **extra}
        rows.append(row)
        on_row(row)

    def fp16(b):
        with torch.autocast("cuda", dtype=torch.float16):
            return model.detect(b.contiguous(memory_format=torch.channels_last))

    eager = [("eager FP32", lambda b: model.detect(b))]
    if cuda:
        eager.append(("eager FP16 autocast + channels_last", fp16))
    for name, fn in eager:
        for bs in batches:
            chunks = [images[i : i + bs].to(dev) for i in range(0, len(images) - bs + 1, bs)]
            add(name, bs, rate(fn, chunks, max(4, iters // bs), sync=cuda))
    backends = {"torch backend FP32, deploy module, eager": {"precision": "fp32", "graphs": False}}
    if cuda:
        backends["torch backend FP32 + CUDA graph"] = {"precision": "fp32"}
        backends["torch backend FP16 + CUDA graph"] = {"precision": "fp16"}
    host = images.numpy()
    outputs = {}
    for name, opts in backends.items():
        be = open_backend(checkpoint, device=dev.type, conf_thresh=0.001, topk=topk, **opts)
        chunks = [be.infer(host[i : i + 8]) for i in range(0, len(host), 8)]
        outputs[name] = tuple(np.concatenate(x) for x in zip(*chunks, strict=True))
        for bs in batches:
            slot = be.slot(be.bucket(bs))
            slot["input"][:bs].copy_(images[:bs].to(dev, be.dtype))
            label = name + (", csrc RoIAlign" if getattr(be, "kernels", False) else "")
            add(label, bs, rate(lambda _b, be=be, bs=bs: be.run(be.bucket(bs)), [images[:bs]],
                                max(4, iters // bs), sync=cuda), nms_reruns=be.nms_reruns)  # fmt: skip
        be.close()
    if cuda and compile_trunk:
        t0 = time.perf_counter()
        model.net.backbone = torch.compile(model.net.backbone, dynamic=False)
        with torch.no_grad():
            for bs in batches:
                fp16(images[:bs].to(dev))
        seconds = time.perf_counter() - t0
        for bs in batches:
            chunks = [images[i : i + bs].to(dev) for i in range(0, len(images) - bs + 1, bs)]
            add("eager FP16 + torch.compile(trunk+FPN)", bs, rate(fp16, chunks, max(4, iters // bs), sync=True),
                compile_s=seconds)  # fmt: skip
    ref_name = "torch backend FP32, deploy module, eager"
    agree = {name: agreement(outputs[ref_name], out) for name, out in outputs.items() if name != ref_name}
    return {"rows": rows, "agreement": agree, "reference": ref_name}


def markdown(result: dict, env: dict, *, source: str, size: int) -> str:
    lines = [f"# Mask R-CNN inference ({env['device']})", "",
             f"{env['date']} · torch {env['torch']} · input {size}² · {source}. × = vs eager FP32 (torchvision) at "
             "the same batch. Generated by `python -m deploy.benchmark --parts maskrcnn`.", "",
             "| variant | batch | img/s | × eager FP32 | graph-NMS re-runs |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['batch']} | {r['img_s']:.1f} | {r['x_eager_fp32']:.2f} | "
                     f"{r.get('nms_reruns', '-')} |")  # fmt: skip
    lines += ["", f"Agreement with `{result['reference']}` on the same images (detections at score ≥ {MATCH_SCORE}; "
              f"matched = same box at IoU ≥ {MATCH_IOU}):", "",
              "| backend | reference detections | matched | mean mask IoU of matches |",
              "|---|---:|---:|---:|"]  # fmt: skip
    if not result["agreement"]:
        lines.append("| (one backend on a CPU: nothing to compare) | | | |")
    for name, a in result["agreement"].items():
        lines.append(f"| {name} | {a['detections']} | {a['matched']:.3f} | {a['mask_iou']:.3f} |")
    return "\n".join(lines) + "\n"
