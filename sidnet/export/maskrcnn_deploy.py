"""Static-shape Mask R-CNN inference for export: torchvision's eval path rewritten with fixed tensor sizes only.

torchvision's ``MaskRCNN`` inference is a chain of data-dependent shapes (per-level ``nonzero`` in the pooler, NMS
outputs, score filtering). :class:`MaskRCNNDeploy` computes the same thing with every intermediate of fixed size, so
the ONNX has static shapes throughout and TensorRT can plan it:

- RPN: per level top-``pre_nms`` proposals by objectness, box decode, clip; invalid ones (torchvision's
  ``remove_small_boxes``) become empty boxes that suppress nothing; NMS per level (coordinate offsets, as
  ``batched_nms``); the kept ones sorted by score into ``post_nms`` rows (+ a validity mask).
- box head on every row, person score and box decode, ``score > box_score_thresh`` and non-small, NMS 0.5, top
  ``topk`` rows → ``detections``; mask head on those rows → ``masks`` (28×28 probabilities per row).
- pooling: :class:`PyramidRoIAlign`, the FPN's multi-level RoIAlign in standard ops (``GridSample`` per level +
  select), which graph surgery turns into one ``sidnet::PyramidRoIAlign`` node for the plugins target.
- NMS: ``nms="onnx"`` traces ``torchvision.ops.nms`` → ONNX ``NonMaxSuppression`` (TensorRT's INMSLayer);
  ``nms="scan"`` is the same greedy NMS as an ONNX ``Scan`` over the score-sorted IoU matrix, for runtimes without an
  NMS layer (TensorRT-RTX 1.7 parses NonMaxSuppression but has no kernel for it); ``nms="graph"`` is the same greedy
  NMS as a fixed number of matrix steps (no data-dependent shape, no host sync), so the torch backend can capture the
  whole module in one CUDA graph; :attr:`MaskRCNNDeploy.nms_converged` says whether those steps reached greedy's
  answer (:func:`greedy_fixed_point`), and the backend re-runs a batch with ``nms="onnx"`` when they did not.
- ``for_cuda_graphs()`` switches to ``nms="graph"`` and (with the kernels library) the ``csrc/roialign`` pyramid
  RoIAlign kernel; the box arithmetic stays float32 when the network runs in float16.

Outputs (batch N fixed at export): ``detections`` float32 (N, K, 6) ``[x1, y1, x2, y2, score, class]`` in input
pixels, score-descending, zero rows after ``num_detections`` int32 (N,); ``masks`` float32 (N, K, 28, 28), each row's
mask probabilities inside its box (paste with ``torchvision.models.detection.roi_heads.paste_masks_in_image``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection.image_list import ImageList

from sidnet.models.maskrcnn import PersonMaskRCNN, backbone_features, feature_names

OUTPUT_NAMES = ("detections", "num_detections", "masks")
NMS_MODES = ("onnx", "scan", "graph")
GRAPH_NMS_STEPS = 32  # nms="graph": matrix steps per NMS (greedy's dependency depth on real images is far lower)


class PyramidRoIAlign(nn.Module):
    """torchvision ``MultiScaleRoIAlign`` (``aligned=False``) with static shapes: ``(features..., rois)`` →
    (N, R, C, P, P); ``features`` finest first, ``rois`` (N, R, 4) xyxy input pixels inside the image.

    Every level samples every RoI with ``grid_sample`` (bilinear, border, align_corners: torchvision's sampling for
    points inside the map), then each RoI keeps the level its size selects (``LevelMapper``). Graph surgery finds this
    module by path and makes it one ``sidnet::PyramidRoIAlign`` node; its attributes are :meth:`attrs`.
    """

    def __init__(self, *, output_size: int, sampling_ratio: int, scales: list[float], canonical_level: float = 4.0,
                 canonical_size: float = 224.0) -> None:  # fmt: skip
        super().__init__()
        self.output_size, self.sampling_ratio, self.scales = output_size, sampling_ratio, [float(s) for s in scales]
        self.canonical_level, self.canonical_size = canonical_level, canonical_size
        self.min_level = round(-math.log2(self.scales[0]))
        self.kernel = False  # True: the csrc/roialign kernel on CUDA tensors (set by MaskRCNNDeploy.for_cuda_graphs)

    def attrs(self) -> dict:
        return {"output_size": int(self.output_size), "sampling_ratio": int(self.sampling_ratio),
                "scales": self.scales, "min_level": int(self.min_level),
                "canonical_level": float(self.canonical_level),
                "canonical_size": float(self.canonical_size)}  # fmt: skip

    def levels(self, rois: torch.Tensor) -> torch.Tensor:
        size = ((rois[..., 2] - rois[..., 0]) * (rois[..., 3] - rois[..., 1])).sqrt()
        lvl = torch.floor(self.canonical_level + torch.log2(size / self.canonical_size) + 1e-6)
        return lvl.clamp(self.min_level, self.min_level + len(self.scales) - 1) - self.min_level

    def _pool(self, feature: torch.Tensor, rois: torch.Tensor, scale: float) -> torch.Tensor:
        n, r = rois.shape[:2]
        c, h, w = feature.shape[1:]
        p, sr = self.output_size, self.sampling_ratio
        q = p * sr
        steps = (torch.arange(q, dtype=rois.dtype, device=rois.device) + 0.5) / sr  # (Q,) in bins
        x0, y0 = rois[..., 0] * scale, rois[..., 1] * scale
        bw = (rois[..., 2] * scale - x0).clamp(min=1.0) / p
        bh = (rois[..., 3] * scale - y0).clamp(min=1.0) / p
        gx = (x0[..., None] + steps * bw[..., None]) / (w - 1) * 2 - 1  # (N, R, Q)
        gy = (y0[..., None] + steps * bh[..., None]) / (h - 1) * 2 - 1
        grid = torch.stack([gx[:, :, None, :].expand(n, r, q, q), gy[:, :, :, None].expand(n, r, q, q)], dim=-1)
        grid = grid.reshape(n, r * q, q, 2)
        grid = grid if grid.dtype == feature.dtype else grid.to(feature.dtype)  # float16 features (torch backend)
        out = F.grid_sample(feature, grid, mode="bilinear", padding_mode="border", align_corners=True)
        out = F.avg_pool2d(out, sr) if sr > 1 else out  # (N, C, R·P, P): each bin's sr×sr samples averaged
        return out.reshape(n, c, r, p, p).permute(0, 2, 1, 3, 4)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *features, rois = inputs
        if self.kernel and rois.is_cuda:
            from sidnet.kernels import pyramid_roi_align

            size = (self.output_size, self.output_size)
            return pyramid_roi_align(list(features), rois, output_size=size, sampling_ratio=self.sampling_ratio,
                                     scales=self.scales, canonical_level=self.canonical_level,
                                     canonical_size=self.canonical_size)  # fmt: skip
        levels = self.levels(rois)[..., None, None, None]
        out = None
        for i, (feature, scale) in enumerate(zip(features, self.scales, strict=True)):
            pooled = self._pool(feature, rois, scale)
            out = pooled if out is None else torch.where(levels == i, pooled, out)
        return out


def _iou_matrix(boxes: torch.Tensor) -> torch.Tensor:
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(-1)
    union = area[:, None] + area[None, :] - inter
    return inter / union.clamp(min=1e-9)


def _greedy_scan(over: torch.Tensor) -> torch.Tensor:
    """Greedy NMS over score-sorted boxes as one ``scan``: ``over[i, j]`` = box i suppresses j (j after i)."""
    from torch._higher_order_ops.scan import scan

    def step(suppressed, xs):
        row, onehot = xs
        alive = ~(suppressed & onehot).any()
        return suppressed | (row & alive), alive

    n = over.shape[0]
    dev = over.device  # the torch runtime backend runs this module on CUDA too (eagerly)
    start, eye = torch.zeros(n, dtype=torch.bool, device=dev), torch.eye(n, dtype=torch.bool, device=dev)
    _, keep = scan(step, start, (over, eye))
    return keep


def greedy_fixed_point(over: torch.Tensor, valid: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy NMS over score-sorted boxes in ``steps`` matrix steps: ``over[i, j]`` = box i suppresses j (j after i),
    ``valid`` (P,) the boxes taking part. Returns (keep (P,), converged ()).

    Greedy's answer is the one fixed point of ``keep = valid & ~(overᵀ · keep)`` (box j's fate depends only on the
    boxes before it, so the fixed point is unique), and iterating from ``keep = valid`` fixes box j for good once the
    boxes it depends on are fixed: after d + 1 steps every box whose suppression chain is at most d long is exact.
    ``converged`` is True when the last step changed nothing, i.e. when ``keep`` is exactly greedy's answer."""
    o = over.to(torch.float16 if over.is_cuda else torch.float32)  # 0/1 entries: exact sums in either dtype
    keep = prev = valid
    for _ in range(steps):
        prev = keep
        keep = valid & ~((keep.to(o.dtype)[None, :] @ o)[0] > 0)
    return keep, (keep == prev).all()


def nms_mask(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor, iou: float, mode: str,
             steps: int = GRAPH_NMS_STEPS) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Keep mask (P,) of greedy NMS over the ``valid`` boxes of one image (invalid ones neither kept nor
    suppressing), and for ``mode="graph"`` whether its steps converged (else None). Ties in score resolve like
    torchvision's (stable order)."""
    boxes = torch.where(valid[:, None], boxes, torch.zeros_like(boxes))  # empty boxes overlap nothing
    if mode == "onnx":
        keep = torchvision.ops.nms(boxes, scores, iou)
        return torch.zeros_like(valid).index_fill(0, keep, True) & valid, None
    order = torch.topk(torch.where(valid, scores, torch.full_like(scores, -1.0)), scores.shape[0]).indices
    sorted_boxes = boxes[order]
    over = torch.triu(_iou_matrix(sorted_boxes) > iou, diagonal=1)
    converged = None
    if mode == "graph":
        keep_sorted, converged = greedy_fixed_point(over, valid[order], steps)
    else:
        keep_sorted = _greedy_scan(over)
    return torch.zeros_like(valid).scatter(0, order, keep_sorted) & valid, converged


def decode_boxes(coder, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """torchvision's ``BoxCoder.decode_single`` with the same arithmetic, minus its ``torch.tensor(0.5, device=...)``
    (a host-to-device copy, which a CUDA graph capture refuses)."""
    boxes = boxes.to(rel_codes.dtype)
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = coder.weights
    dx, dy = rel_codes[:, 0::4] / wx, rel_codes[:, 1::4] / wy
    dw = torch.clamp(rel_codes[:, 2::4] / ww, max=coder.bbox_xform_clip)
    dh = torch.clamp(rel_codes[:, 3::4] / wh, max=coder.bbox_xform_clip)
    pred_ctr_x, pred_ctr_y = dx * widths[:, None] + ctr_x[:, None], dy * heights[:, None] + ctr_y[:, None]
    half_w, half_h = 0.5 * (torch.exp(dw) * widths[:, None]), 0.5 * (torch.exp(dh) * heights[:, None])
    return torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h),
                       dim=2).flatten(1)  # fmt: skip


def _topk_rows(scores: torch.Tensor, keep: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k best kept scores per row; unkept rows sort last with value -1."""
    masked = torch.where(keep, scores, torch.full_like(scores, -1.0))
    if masked.shape[1] < k:
        masked = F.pad(masked, (0, k - masked.shape[1]), value=-1.0)
    return torch.topk(masked, k, dim=1)


class MaskRCNNDeploy(nn.Module):
    """``forward(images)`` → (detections, num_detections, masks); see the module docstring."""

    def __init__(self, model: PersonMaskRCNN, *, topk: int, conf_thresh: float, nms: str = "onnx") -> None:
        super().__init__()
        if nms not in NMS_MODES:
            raise ValueError(f"nms must be one of {NMS_MODES}, got {nms!r}")
        net = model.net
        self.model, self.topk, self.nms = model, int(topk), nms
        self.conf_thresh = max(float(conf_thresh), float(net.roi_heads.score_thresh))
        rpn = net.rpn
        self.pre_nms, self.post_nms = rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"]
        self.rpn_nms, self.box_nms = rpn.nms_thresh, net.roi_heads.nms_thresh
        self.rpn_coder, self.box_coder = rpn.box_coder, net.roi_heads.box_coder
        size = model.input_size
        with torch.no_grad():
            feats = backbone_features(model, torch.zeros(1, 3, size, size))
        # torchvision's MultiScaleRoIAlign infers each level's scale as the nearest power of 2 of map / image size.
        scales = [2.0 ** round(math.log2(feats[k].shape[-1] / size)) for k in feature_names(model)]
        self.box_pool = PyramidRoIAlign(output_size=7, sampling_ratio=2, scales=scales)
        self.mask_pool = PyramidRoIAlign(output_size=14, sampling_ratio=2, scales=scales)
        with torch.no_grad():
            blank = ImageList(torch.zeros(1, 3, size, size), [(size, size)])
            anchors = rpn.anchor_generator(blank, list(feats.values()))
        counts = [f.shape[2] * f.shape[3] * rpn.anchor_generator.num_anchors_per_location()[0] for f in feats.values()]
        self.register_buffer("anchors", anchors[0], persistent=False)  # (sum_l H_l·W_l·A, 4), torchvision's order
        self.level_counts = counts
        # nms="graph": whether the last forward's NMS steps all converged (written in place, so a CUDA graph's
        # replay updates it too); True for the other modes.
        self.register_buffer("nms_converged", torch.ones((), dtype=torch.bool), persistent=False)
        self.nms_steps = GRAPH_NMS_STEPS
        t = net.transform  # for nms="graph": normalisation constants already on the device (no copy in a capture)
        self.register_buffer("pixel_mean", torch.tensor(t.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(t.image_std).view(1, 3, 1, 1), persistent=False)

    def for_cuda_graphs(self, *, kernels: bool) -> MaskRCNNDeploy:
        """``nms="graph"`` (capturable) and, when ``kernels``, the csrc pyramid RoIAlign for both poolers."""
        self.nms = "graph"
        self.box_pool.kernel = self.mask_pool.kernel = kernels
        return self

    def _apply(self, fn, *args, **kwargs):  # .half() / .to(dtype) cast the network, never the box arithmetic
        out = super()._apply(fn, *args, **kwargs)
        self.anchors = self.anchors.float()
        return out

    def _decode(self, coder, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """torchvision's decode for export (the traced graph unchanged), the capturable copy for nms="graph"."""
        return decode_boxes(coder, rel_codes, boxes) if self.nms == "graph" else coder.decode_single(rel_codes, boxes)

    def _nms(self, boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor, iou: float) -> torch.Tensor:
        """Keep masks (N, P) of per-image NMS; records convergence for nms="graph"."""
        keeps, flags = zip(*(nms_mask(boxes[i], scores[i], valid[i], iou, self.nms, self.nms_steps)
                             for i in range(boxes.shape[0])), strict=True)  # fmt: skip
        if self.nms == "graph":
            self.nms_converged.copy_(torch.stack(flags).all() & self.nms_converged)
        return torch.stack(keeps)

    def proposals(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, post_nms, 4) proposals by score, (N, post_nms) validity."""
        rpn, size = self.model.net.rpn, float(self.model.input_size)
        obj, deltas = rpn.head(feats)
        n = feats[0].shape[0]
        boxes, scores, level_ids = [], [], []
        start = 0
        for lvl, (o, d, count) in enumerate(zip(obj, deltas, self.level_counts, strict=True)):
            o = o.float().permute(0, 2, 3, 1).reshape(n, -1)  # torchvision's permute_and_flatten: (N, H·W·A)
            a = o.shape[1] // (d.shape[2] * d.shape[3])
            d = d.float().view(n, a, 4, d.shape[2], d.shape[3]).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
            k = min(self.pre_nms, count)
            top, idx = o.topk(k, dim=1)
            anchors = self.anchors[start : start + count][idx]  # (N, k, 4)
            dd = torch.gather(d, 1, idx[..., None].expand(n, k, 4))
            b = self._decode(self.rpn_coder, dd.reshape(-1, 4), anchors.reshape(-1, 4)).reshape(n, k, 4)
            boxes.append(b.clamp(0.0, size))
            scores.append(torch.sigmoid(top))
            level_ids.append(torch.full((k,), float(lvl), device=o.device))
            start += count
        boxes, scores, lvl = torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(level_ids)
        wh = boxes[..., 2:] - boxes[..., :2]
        valid = (wh >= 1e-3).all(-1) & (scores >= 0.0)
        offset = (lvl * (size + 1))[:, None]
        keep = self._nms(boxes + offset, scores, valid, self.rpn_nms)
        top, idx = _topk_rows(scores, keep, self.post_nms)
        props = torch.gather(F.pad(boxes, (0, 0, 0, max(0, self.post_nms - boxes.shape[1]))), 1,
                             idx[..., None].expand(n, self.post_nms, 4))  # fmt: skip
        return props, top >= 0.0

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        net, size = self.model.net, float(self.model.input_size)
        if self.nms == "graph":
            self.nms_converged.fill_(True)
            fmap = net.backbone((images - self.pixel_mean) / self.pixel_std)  # = backbone_features, capturable
        else:
            fmap = backbone_features(self.model, images)
        feats = list(fmap.values())
        pooled_maps = feats[: len(self.box_pool.scales)]
        props, prop_valid = self.proposals(feats)
        n, r = props.shape[:2]
        pooled = self.box_pool(*pooled_maps, props)
        logits, regression = net.roi_heads.box_predictor(net.roi_heads.box_head(pooled.flatten(0, 1)))
        logits, regression = logits.float(), regression.float()
        scores = F.softmax(logits, -1)[:, 1].view(n, r)
        boxes = self._decode(self.box_coder, regression[:, 4:8], props.reshape(-1, 4)).view(n, r, 4).clamp(0.0, size)
        wh = boxes[..., 2:] - boxes[..., :2]
        valid = prop_valid & (scores > net.roi_heads.score_thresh) & (wh >= 1e-2).all(-1)
        keep = self._nms(boxes, scores, valid, self.box_nms)
        top, idx = _topk_rows(scores, keep, self.topk)
        det_boxes = torch.gather(F.pad(boxes, (0, 0, 0, max(0, self.topk - r))), 1,
                                 idx[..., None].expand(n, self.topk, 4))  # fmt: skip
        ok = top >= self.conf_thresh
        det = torch.cat([det_boxes, top[..., None], torch.zeros_like(top)[..., None]], -1)
        det = torch.where(ok[..., None], det, torch.zeros_like(det))
        mask_feats = net.roi_heads.mask_head(self.mask_pool(*pooled_maps, det[..., :4]).flatten(0, 1))
        mask_logits = net.roi_heads.mask_predictor(mask_feats)[:, 1].float()
        masks = torch.sigmoid(mask_logits).view(n, self.topk, *mask_logits.shape[-2:])
        masks = torch.where(ok[..., None, None], masks, torch.zeros_like(masks))
        return det, ok.sum(1).to(torch.int32), masks
