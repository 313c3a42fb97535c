"""Person Mask R-CNN: contract shapes, weight loading (person rows of a 91-class torchvision file), and a few-image
overfit through the task interface the trainer uses (loss must halve)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

from sidnet.data import DetectionDataset, read_coco
from sidnet.engine.tasks import InstanceSegmentationTask, build_task
from sidnet.models import build_model
from sidnet.models.maskrcnn import person_rows


def test_shapes_train_and_eval():
    torch.manual_seed(0)
    model = build_model("maskrcnn", input_size=128, pretrained=None, detections_per_img=10)
    assert isinstance(build_task(model), InstanceSegmentationTask)
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 120.0]]), "labels": torch.tensor([0]),
                "masks": torch.zeros(1, 128, 128, dtype=torch.uint8).index_fill_(1, torch.arange(20, 120), 1)},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 128, 128, dtype=torch.uint8)}]  # fmt: skip
    model.train()
    total, parts = model.loss(torch.rand(2, 3, 128, 128), targets)
    assert set(parts) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert torch.isfinite(total) and total.requires_grad
    model.eval()
    with torch.no_grad():
        out = model.detect(torch.rand(2, 3, 128, 128))
    for o in out:
        k = len(o["scores"])
        assert k <= 10 and o["boxes"].shape == (k, 4) and o["masks"].shape == (k, 128, 128)
        assert (o["labels"] == 0).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        build_model("maskrcnn", input_size=100, pretrained=None)
    with pytest.raises(ValueError, match="num_classes must be 1"):
        build_model("maskrcnn", num_classes=2, pretrained=None)


@pytest.mark.slow
def test_full_coco_maskrcnn_file_is_finetuned_to_person(tmp_path):
    torch.manual_seed(0)
    coco = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict()
    path = tmp_path / "maskrcnn_coco.pt"
    torch.save(coco, path)
    model = build_model("maskrcnn", input_size=128, backbone="resnet50", pretrained=None, weights=str(path))
    state = model.net.state_dict()
    cls = coco["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(state["roi_heads.box_predictor.cls_score.weight"], cls[[0, 1]])
    bias = "roi_heads.box_predictor.bbox_pred.bias"
    assert torch.equal(state[bias], coco[bias][:8])
    assert torch.equal(state["roi_heads.mask_predictor.mask_fcn_logits.weight"],
                       coco["roi_heads.mask_predictor.mask_fcn_logits.weight"][[0, 1]])  # fmt: skip
    assert torch.equal(state["backbone.body.layer1.0.conv1.weight"], coco["backbone.body.layer1.0.conv1.weight"])
    assert person_rows(person_rows(coco))["roi_heads.box_predictor.cls_score.bias"].shape == (2,)
    with pytest.raises(ValueError, match="does not fit this Mask R-CNN"):  # a ResNet file for the MobileNetV2 trunk
        build_model("maskrcnn", input_size=128, pretrained=None, weights=str(path))
    bad = tmp_path / "not_tensors.pt"
    torch.save({"model": object()}, bad)
    with pytest.raises(ValueError, match="not a tensors-only torch file"):
        build_model("maskrcnn", input_size=128, pretrained=None, weights=str(bad))


@pytest.mark.slow
def test_few_image_overfit_halves_the_loss(shared_data: Path):
    root = shared_data / "coco128"
    records, _ = read_coco(annotations=root / "annotations/instances_train2017.json", images=root / "images/train2017",
                           masks=True)  # fmt: skip
    records = [r for r in records if 1 <= len(r.boxes) <= 3][:2]
    dataset = DetectionDataset(records, size=128, masks=True)
    images = torch.stack([dataset[i][0] for i in range(2)])
    targets = [dataset[i][1] for i in range(2)]
    torch.manual_seed(0)
    model = build_model("maskrcnn", input_size=128).train()
    task = build_task(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        loss, _ = task.loss(model, images, targets, amp=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def _mixed_batch(box_only_masks: torch.Tensor, *, has_masks: bool) -> list[dict]:
    """Image 0 with an instance mask; image 1 with a box whose mask rows are ``box_only_masks``."""
    mask0 = torch.zeros(1, 128, 128, dtype=torch.uint8)
    mask0[0, 30:110, 20:60] = 1
    return [{"boxes": torch.tensor([[20.0, 30.0, 60.0, 110.0]]), "labels": torch.tensor([0]), "masks": mask0},
            {"boxes": torch.tensor([[50.0, 10.0, 120.0, 100.0]]), "labels": torch.tensor([0]),
             "masks": box_only_masks, "has_masks": has_masks}]  # fmt: skip


def _losses(model, images, targets) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)  # the RPN's and the heads' proposal sampling
    return model.loss(images, targets)[1]


def test_box_only_images_train_the_box_heads_and_not_the_mask_head():
    """A box-only image (``has_masks`` False) changes the box losses as any image does, but its mask rows never reach
    the mask loss: two different garbage masks give identical losses (and, marked as masked, different ones)."""
    torch.manual_seed(0)
    model = build_model("maskrcnn", input_size=128, pretrained=None).train()
    images = torch.rand(2, 3, 128, 128)
    gen = torch.Generator().manual_seed(2)
    garbage = [torch.randint(0, 2, (1, 128, 128), generator=gen, dtype=torch.uint8) for _ in range(2)]
    ignored = [_losses(model, images, _mixed_batch(g, has_masks=False)) for g in garbage]
    used = [_losses(model, images, _mixed_batch(g, has_masks=True)) for g in garbage]
    assert all(torch.equal(ignored[0][k], ignored[1][k]) for k in ignored[0])
    assert not torch.equal(used[0]["loss_mask"], used[1]["loss_mask"])  # the masks would matter if they were used
    for k in ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"):  # the box side is shared
        assert torch.equal(ignored[0][k], used[0][k]), k
    # Only box-only images: the mask loss is an exact zero with no gradient into the mask head; the box losses train.
    only = [{**t, "has_masks": False} for t in _mixed_batch(garbage[0], has_masks=False)]
    parts = _losses(model, images, only)
    assert parts["loss_mask"].item() == 0.0
    model.zero_grad()
    sum(parts.values()).backward()
    mask_grads = [p.grad for p in model.net.roi_heads.mask_predictor.parameters()]
    assert all(g is None or not g.any() for g in mask_grads)
    assert model.net.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    # A batch where every image has masks is torchvision's RoIHeads unchanged.
    from torchvision.models.detection.roi_heads import RoIHeads

    masked = _mixed_batch(garbage[0], has_masks=True)
    mine = _losses(model, images, masked)
    model.net.roi_heads.__class__ = RoIHeads
    theirs = _losses(model, images, [{k: v for k, v in t.items() if k != "has_masks"} for t in masked])
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
