"""The YOLOv2 region loss (Darknet ``region_layer.c`` semantics, objectness as BCE-with-logits).

Per ground-truth box: the cell containing its centre and the anchor of best shape IoU are responsible.
- coordinates: squared error on sigmoid(tx, ty) vs the centre offset in the cell and on (tw, th) vs
  log(box / anchor), weighted ``coord_scale · (2 − w·h / S²)`` so small boxes count more (as Darknet);
- objectness: responsible predictions → 1, weight ``obj_scale``;
- no-object: every other prediction → 0, weight ``noobj_scale``, unless its decoded box overlaps some ground
  truth by more than ``ignore_thresh`` IoU (then it is neither pushed up nor down);
- class: cross-entropy of the class logits for responsible predictions (constant for one class, skipped).
Darknet's early "prior" term (pulling all boxes to anchor shapes for the first 12,800 images) is left out: with
warm-up it made no difference in our runs and it couples the loss to the image counter.

Options (defaults = the semantics above); none changes the network or its decode, so exports are unaffected:
- ``rescore=True``: the objectness target of a responsible prediction is the IoU of its decoded box with the
  truth (Darknet's ``rescore=1`` of ``yolov2.cfg``), so the score ranks boxes by how well they fit;
- ``box_loss="ciou"``: complete-IoU loss (:func:`complete_iou_loss`: torchvision's ``complete_box_iou_loss``
  without its boolean-mask assignment, which made the host wait for the GPU twice a step) on the decoded
  responsible box instead of the squared errors on (tx, ty, tw, th), with the same small-box weight;
- ``assign="free"``: when two truths fall on the same (image, anchor, cell) — crowds at stride 32 — the later ones
  take their next-best anchor of that cell that is still free instead of overwriting the first (YOLOv2 keeps one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sidnet.config import ASSIGNERS, BOX_LOSSES


def _batched_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of xyxy boxes (N, M, 4) × (N, K, 4) → (N, M, K)."""
    lt = torch.max(boxes1[:, :, None, :2], boxes2[:, None, :, :2])
    rb = torch.min(boxes1[:, :, None, 2:], boxes2[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area1 = (boxes1[..., 2:] - boxes1[..., :2]).prod(-1)
    area2 = (boxes2[..., 2:] - boxes2[..., :2]).prod(-1)
    return inter / (area1[:, :, None] + area2[:, None, :] - inter).clamp(min=1e-9)


def complete_iou_loss(boxes1: torch.Tensor, boxes2: torch.Tensor, *, eps: float = 1e-7) -> torch.Tensor:
    """Complete-IoU loss (Zheng et al., 2020) of paired xyxy boxes (…, 4) → (…): the same values and gradients as
    ``torchvision.ops.complete_box_iou_loss(reduction="none")``, whose intersection is a boolean-mask assignment
    (``inter[mask] = …``): its forward and backward each read the mask's size back to the host, a sync per step.
    Here the intersection is clamped at zero instead, which has no data-dependent shape."""
    x1, y1, x2, y2 = boxes1.unbind(-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(-1)
    w, h, wg, hg = x2 - x1, y2 - y1, x2g - x1g, y2g - y1g
    inter_w = (torch.min(x2, x2g) - torch.max(x1, x1g)).clamp(min=0)
    inter = inter_w * (torch.min(y2, y2g) - torch.max(y1, y1g)).clamp(min=0)
    iou = inter / (w * h + wg * hg - inter + eps)
    # the smallest enclosing box's squared diagonal and the squared distance of the two centres
    diagonal = (torch.max(x2, x2g) - torch.min(x1, x1g)) ** 2 + (torch.max(y2, y2g) - torch.min(y1, y1g)) ** 2 + eps
    centres = ((x1 + x2) / 2 - (x1g + x2g) / 2) ** 2 + ((y1 + y2) / 2 - (y1g + y2g) / 2) ** 2
    v = (4 / torch.pi**2) * (torch.atan(wg / hg) - torch.atan(w / h)) ** 2
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return 1 - iou + centres / diagonal + alpha * v


def _decode_xyxy(
    pxy: torch.Tensor, twh: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor, anchor_wh: torch.Tensor, *,
    stride: tuple[float, float],
) -> torch.Tensor:
    """YOLOv2's box decode to (x1, y1, x2, y2) input pixels: sigmoid offsets ``pxy`` (…, 2) in cells (``gx``, ``gy``),
    raw ``twh`` (…, 2) scaling ``anchor_wh`` (…, 2); all broadcast against each other."""
    cx, cy = (pxy[..., 0] + gx) * stride[0], (pxy[..., 1] + gy) * stride[1]
    bw = torch.exp(twh[..., 0].clamp(max=10)) * anchor_wh[..., 0]
    bh = torch.exp(twh[..., 1].clamp(max=10)) * anchor_wh[..., 1]
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)


def flat_slot(bidx: torch.Tensor, anchor: torch.Tensor | int, gj: torch.Tensor, gi: torch.Tensor, *,
              anchors: int, grid: tuple[int, int]) -> torch.Tensor:
    """The index of (image, anchor, row, column) in a flattened (N, A, H, W) map."""
    h, w = grid
    return ((bidx * anchors + anchor) * h + gj) * w + gi


def assign_anchors(
    order: torch.Tensor, bidx: torch.Tensor, gj: torch.Tensor, gi: torch.Tensor, *, grid: tuple[int, int], free: bool,
    images: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The anchor each truth trains: (anchor (K,) int64, kept (K,) bool).

    ``order`` (K, A): anchors by shape IoU, best first; ``bidx`` (K,) the image of each truth, ``images`` how many
    there are. ``free=False``: the best one, every truth kept (two truths on one (image, anchor, cell) write the same
    slot and the later one wins, as in Darknet). ``free=True``: in A rounds, each truth not yet placed asks for its
    r-th best anchor of its cell; a slot free after the earlier rounds goes to the first truth (in order) asking for
    it. A truth is dropped (``kept`` False) only when every anchor of its cell is taken. Fixed shapes and dense slot
    tables: no host synchronisation, a few kernels per round whatever the batch.
    """
    k, a = order.shape
    if not free or k == 0:
        return order[:, 0], torch.ones(k, dtype=torch.bool, device=order.device)
    h, w = grid
    slots = images * a * h * w  # one more, index `slots`, takes the truths that are not asking this round
    idx = torch.arange(k, device=order.device)
    anchor = order[:, 0].clone()
    kept = torch.zeros(k, dtype=torch.bool, device=order.device)
    taken = torch.zeros(slots + 1, dtype=torch.bool, device=order.device)
    first = torch.empty(slots + 1, dtype=torch.long, device=order.device)
    cell = flat_slot(bidx, 0, gj, gi, anchors=a, grid=grid)  # anchor 0's slot; anchor r's is r·H·W further
    for r in range(a):
        key = cell + order[:, r] * (h * w)
        asking = ~kept & ~taken[key]
        key = torch.where(asking, key, slots)
        first.fill_(k).scatter_reduce_(0, key, idx, reduce="amin")  # the earliest truth asking for each slot
        won = asking & (first[key] == idx)
        kept |= won
        anchor = torch.where(won, order[:, r], anchor)
        taken.index_fill_(0, torch.where(won, key, slots), True)  # not taken[...] = True: that copies the scalar
    return anchor, kept


def wh_iou(wh1: torch.Tensor, wh2: torch.Tensor) -> torch.Tensor:
    """IoU of (N,2) and (M,2) box sizes placed at a common centre → (N, M)."""
    inter = torch.min(wh1[:, None], wh2[None]).prod(-1)
    return inter / (wh1.prod(-1)[:, None] + wh2.prod(-1)[None] - inter)


class RegionLoss(nn.Module):
    """``forward(raw (N, A·(5+C), H, W), targets)`` → (total loss scalar averaged over the batch, parts dict).

    ``targets``: list of N dicts with ``boxes`` float (K, 4) xyxy in network-input pixels and ``labels``
    int64 (K,). Anchors are (A, 2) in input pixels, as the model's :class:`RegionDecode` holds them.
    """

    def __init__(
        self,
        anchors: torch.Tensor,
        *,
        num_classes: int,
        input_size: int,
        coord_scale: float = 1.0,
        obj_scale: float = 5.0,
        noobj_scale: float = 1.0,
        class_scale: float = 1.0,
        ignore_thresh: float = 0.6,
        rescore: bool = False,
        box_loss: str = "mse",
        assign: str = "best",
    ) -> None:
        super().__init__()
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"loss.box_loss={box_loss!r} is invalid: use one of {', '.join(BOX_LOSSES)}")
        if assign not in ASSIGNERS:
            raise ValueError(f"loss.assign={assign!r} is invalid: use one of {', '.join(ASSIGNERS)}")
        self.register_buffer("anchors", torch.as_tensor(anchors, dtype=torch.float32).reshape(-1, 2).clone())
        self.num_classes = num_classes
        self.input_size = input_size
        self.coord_scale, self.obj_scale, self.noobj_scale = coord_scale, obj_scale, noobj_scale
        self.class_scale, self.ignore_thresh = class_scale, ignore_thresh
        self.rescore, self.box_loss, self.assign = rescore, box_loss, assign

    def forward(
        self, raw: torch.Tensor, targets: list[dict], *, input_size: int | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``input_size``: the side of the images ``raw`` came from when it differs from the configured one
        (multi-scale training, :mod:`sidnet.data.multiscale`); the stride and the box-size weight follow it."""
        n, _, h, w = raw.shape
        a = self.anchors.shape[0]
        p = raw.float().reshape(n, a, 5 + self.num_classes, h, w).permute(0, 1, 3, 4, 2)  # (N, A, H, W, 5+C)
        size = input_size or self.input_size
        sx, sy = size / w, size / h
        anchors = self.anchors.to(p.device)

        pxy = torch.sigmoid(p[..., 0:2])
        # Decoded boxes only decide which predictions to ignore: no gradient flows through them.
        with torch.no_grad():
            gy, gx = torch.meshgrid(torch.arange(h, device=p.device), torch.arange(w, device=p.device), indexing="ij")
            pred = _decode_xyxy(pxy, p[..., 2:4], gx, gy, anchors.view(1, a, 1, 1, 2), stride=(sx, sy))
            pred = pred.reshape(n, -1, 4)

        noobj_mask = torch.ones(n, a, h, w, dtype=torch.bool, device=p.device)
        counts = [len(t["boxes"]) for t in targets]
        zero = p.sum() * 0.0
        parts = {"xy": zero, "wh": zero, "obj": zero, "noobj": zero, "cls": zero}
        if sum(counts):
            # The truths as one (ΣK, 4) tensor with their (image, position) built on the host from the counts and
            # moved in one copy: a fixed number of kernels and no host synchronisation, whatever the batch size.
            boxes = torch.cat([t["boxes"].reshape(-1, 4) for t in targets]).to(p)
            bidx, slot = _owners(counts, device=p.device)
            with torch.no_grad():  # ignore mask: each prediction's best IoU with a truth of its image
                gt = boxes.new_zeros(n, max(counts), 4)
                gt[bidx, slot] = boxes  # the padding stays (0, 0, 0, 0): IoU 0 with any box
                best = _batched_iou(pred, gt).amax(dim=2)  # (N, A·H·W)
                noobj_mask &= (best <= self.ignore_thresh).view(n, a, h, w)

            # Assign every ground truth to (image, anchor, cell).
            gw, gh = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-3), (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-3)
            gcx, gcy = (boxes[:, 0] + boxes[:, 2]) / 2 / sx, (boxes[:, 1] + boxes[:, 3]) / 2 / sy
            gi, gj = gcx.long().clamp(0, w - 1), gcy.long().clamp(0, h - 1)
            order = wh_iou(torch.stack([gw, gh], 1), anchors).argsort(dim=1, descending=True, stable=True)
            best_a, kept = assign_anchors(order, bidx, gj, gi, grid=(h, w), free=self.assign == "free", images=n)
            # A dropped truth (free assignment, its cell full) points at a slot another truth owns: clearing it is a
            # no-op, and its rows are left out of the sums below (by a mask: no data-dependent shape).
            # index_fill_ takes the value as a kernel argument; noobj_mask[...] = False would copy a host scalar to
            # the GPU, which waits for it (found by tests/test_models.py's sync-debug test on the H100)
            noobj_mask.view(-1).index_fill_(0, flat_slot(bidx, best_a, gj, gi, anchors=a, grid=(h, w)), False)

            pr = p[bidx, best_a, gj, gi]  # (K, 5+C) responsible predictions
            scale = self.coord_scale * (2.0 - gw * gh / (size**2))
            pxy_r = torch.sigmoid(pr[:, 0:2])
            if self.box_loss == "mse":
                txy = torch.stack([gcx - gi, gcy - gj], 1)
                twh = torch.log(torch.stack([gw / anchors[best_a, 0], gh / anchors[best_a, 1]], 1))
                parts["xy"] = _kept_sum(scale[:, None] * (pxy_r - txy) ** 2, kept)
                parts["wh"] = _kept_sum(scale[:, None] * (pr[:, 2:4] - twh) ** 2, kept)
            if self.box_loss == "ciou" or self.rescore:
                # The responsible predictions' decoded boxes, with gradient (input pixels).
                pbox = _decode_xyxy(pxy_r, pr[:, 2:4], gi, gj, anchors[best_a], stride=(sx, sy))
            if self.box_loss == "ciou":  # reported as "xy" ("wh" stays 0): one box term
                parts["xy"] = _kept_sum(scale * complete_iou_loss(pbox, boxes), kept)
            obj_target = torch.ones_like(pr[:, 4])
            if self.rescore:
                obj_target = _batched_iou(pbox.detach()[:, None], boxes[:, None]).flatten()  # row i with truth i
            obj = F.binary_cross_entropy_with_logits(pr[:, 4], obj_target, reduction="none")
            parts["obj"] = self.obj_scale * _kept_sum(obj, kept)
            if self.num_classes > 1:
                labels = torch.cat([t["labels"].reshape(-1) for t in targets]).to(p.device).long()
                ce = F.cross_entropy(pr[:, 5:], labels, reduction="none")
                parts["cls"] = self.class_scale * _kept_sum(ce, kept)
        obj_logits = p[..., 4]  # every prediction not responsible and not ignored: objectness → 0
        noobj = F.binary_cross_entropy_with_logits(obj_logits, torch.zeros_like(obj_logits), reduction="none")
        parts["noobj"] = self.noobj_scale * _kept_sum(noobj, noobj_mask)
        parts = {k: v / n for k, v in parts.items()}
        return sum(parts.values()), parts


def _kept_sum(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over the rows (leading dims) where ``keep`` holds: a masked sum instead of ``x[keep]``, whose
    data-dependent shape would make the host wait for the GPU. Left-out rows add exactly 0, even if not finite."""
    return torch.where(keep.view(*keep.shape, *([1] * (x.dim() - keep.dim()))), x, 0.0).sum()


def _owners(counts: list[int], *, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For truths concatenated image by image (``counts`` per image): each one's image and its position within the
    image, as int64 tensors on ``device`` — built on the host and moved in one asynchronous copy."""
    per_image = torch.tensor(counts)
    bidx = torch.repeat_interleave(torch.arange(len(counts)), per_image)
    slot = torch.arange(len(bidx)) - (per_image.cumsum(0) - per_image)[bidx]
    both = torch.stack([bidx, slot]).to(device, non_blocking=True)
    return both[0], both[1]
