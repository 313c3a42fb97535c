"""The Mask R-CNN parts of ``python -m export``: trace the static-shape deploy module, run the surgery, check parity on
real images against torchvision's own eager inference. :func:`sidnet.export.pipeline.run_export` calls these for a
:class:`~sidnet.models.maskrcnn.PersonMaskRCNN`; options, checker, report and engine build are shared with SIDNet.

Parity (fp32): every PyTorch detection (``model.detect``) must have an exported one with box IoU >= 0.99 and score
within 1e-3, and their masks (the exported 28×28 pasted with torchvision's ``paste_masks_in_image``, both at 0.5)
IoU >= 0.95. Rows whose score is within the score tolerance of the cut (``conf_thresh`` or the K-th score) may be
kept by one side only: that membership is ambiguous, not wrong, and is counted as a boundary tie.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import onnx
import torch

from sidnet.export.maskrcnn_deploy import OUTPUT_NAMES, MaskRCNNDeploy, PyramidRoIAlign
from sidnet.graph.errors import ExportError
from sidnet.graph.onnx_export import MIN_OPSET, module_scopes, quiet_exporter
from sidnet.graph.surgery import rewrite
from sidnet.graph.wrapper import INPUT_NAME
from sidnet.models.maskrcnn import PersonMaskRCNN

log = logging.getLogger("sidnet.export")

TOLERANCE = {"box_iou": 0.99, "mask_iou": 0.95, "score": 1e-3}
PREPROCESSING = (
    "images: float32 NCHW [1, 3, S, S], RGB, values in [0, 1] (pixel / 255), letterboxed to S x S (long side S, "
    "aspect kept, centred, gray 114/255 padding). Normalisation is inside the model."
)
OUTPUTS = (
    "detections: float32 [1, K, 6] rows [x1, y1, x2, y2, score, class] in input pixels, score-descending, zero rows "
    "after the valid ones, NMS included; num_detections: int32 [1]; masks: float32 [1, K, 28, 28] mask probabilities "
    "inside each row's box (paste into the image with torchvision's paste_masks_in_image, threshold 0.5)."
)


def nms_mode(backend: str) -> str:
    """ONNX NonMaxSuppression (TensorRT's INMSLayer) unless the runtime lacks an NMS kernel (TensorRT-RTX 1.7)."""
    return "scan" if backend == "tensorrt-rtx" else "onnx"


def export_maskrcnn_onnx(deploy: MaskRCNNDeploy, *, opset: int) -> onnx.ModelProto:
    """Trace the deploy module with a static [1, 3, S, S] input (``torch.export``: node metadata keeps module paths)."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: use opset >= {MIN_OPSET} (default 18)")
    size = deploy.model.input_size
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with quiet_exporter():
        program = torch.onnx.export(deploy.eval(), (images,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=list(OUTPUT_NAMES), opset_version=opset, optimize=True)  # fmt: skip
    return program.model_proto


def build_maskrcnn_graph(deploy: MaskRCNNDeploy, *, target: str, opset: int):
    """(as exported, after surgery, surgery log lines)."""
    exported = export_maskrcnn_onnx(deploy, opset=opset)
    pools = {path: m.attrs() for path, m in deploy.named_modules() if isinstance(m, PyramidRoIAlign)}
    final, slog = rewrite(exported, module_scopes(exported), target=target, roi_aligns=pools)
    return exported, final, slog.lines


def metadata(model: PersonMaskRCNN, deploy: MaskRCNNDeploy) -> dict:
    """The Mask R-CNN entries of the ONNX metadata (the pipeline adds version, weights, target, precision)."""
    return {"anchors": None, "num_classes": 1, "class_names": ["person"], "input_size": model.input_size,
            "input": f"images float32 [1, 3, {model.input_size}, {model.input_size}]", "preprocessing": PREPROCESSING,
            "outputs": OUTPUTS, "conf_thresh": deploy.conf_thresh, "topk": deploy.topk, "nms": deploy.nms,
            "rpn_pre_nms_top_n": deploy.pre_nms, "rpn_post_nms_top_n": deploy.post_nms}  # fmt: skip


def sample_images(size: int, count: int = 4) -> torch.Tensor:
    """Real images for parity: the bundled COCO sample's val images, letterboxed to ``size``."""
    from sidnet.data import DetectionDataset, read_yolo, sample_root

    root = sample_root()
    records, _ = read_yolo(images=root / "images/val2017", labels=root / "labels/boxes/val2017", num_label_classes=1)
    dataset = DetectionDataset(records[:count], size=size)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


@dataclass
class MaskParityResult:
    runtime: str
    images: int
    tolerance: dict[str, float]
    min_box_iou: float = 1.0
    min_mask_iou: float = 1.0
    max_score_diff: float = 0.0
    detections_compared: int = 0
    unmatched: int = 0
    boundary_ties: int = 0
    padding_nonzero: int = 0
    details: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        t = self.tolerance
        return (self.min_box_iou >= t["box_iou"] and self.min_mask_iou >= t["mask_iou"]
                and self.max_score_diff <= t["score"] and not self.unmatched and not self.padding_nonzero)  # fmt: skip

    def summary(self) -> str:
        return (f"{self.runtime} vs PyTorch (torchvision eager) on {self.images} real images: "
                f"{self.detections_compared} detections matched, min box IoU {self.min_box_iou:.4f} (>= "
                f"{self.tolerance['box_iou']}), min mask IoU {self.min_mask_iou:.4f} "
                f"(>= {self.tolerance['mask_iou']}), "
                f"max |score diff| {self.max_score_diff:.2e} (<= {self.tolerance['score']:g}), unmatched "
                f"{self.unmatched}, boundary ties {self.boundary_ties}, nonzero padding rows {self.padding_nonzero} "
                f"-> {'PASS' if self.passed else 'FAIL'}")  # fmt: skip

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou

    return box_iou(a.double(), b.double())


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def check_maskrcnn_parity(deploy: MaskRCNNDeploy, model_onnx: onnx.ModelProto, *, images: torch.Tensor,
                          tolerance: dict[str, float] | None = None) -> MaskParityResult:  # fmt: skip
    """Run ``model_onnx`` (onnxruntime, or onnx.reference for sidnet:: nodes) and torchvision eager on ``images``."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from sidnet.export.parity import run_onnx

    tol = dict(tolerance or TOLERANCE)
    size, k_max, cut = deploy.model.input_size, deploy.topk, deploy.conf_thresh
    result = MaskParityResult(runtime="", images=len(images), tolerance=tol)
    for image in images:
        with torch.no_grad():
            ref = deploy.model.eval().detect(image[None])[0]
        keep = ref["scores"] >= cut
        ref = {k: v[keep][:k_max] for k, v in ref.items()}
        (dets, num, masks), result.runtime = run_onnx(model_onnx, image[None].numpy(), list(OUTPUT_NAMES))
        n = int(num[0])
        dets, masks = torch.from_numpy(dets[0]), torch.from_numpy(masks[0])
        result.padding_nonzero += int(dets[n:].abs().sum(1).gt(0).sum())
        out_boxes, out_scores = dets[:n, :4], dets[:n, 4]
        pasted = paste_masks_in_image(masks[:n, None], out_boxes, (size, size))[:, 0] >= 0.5 if n else None
        ref_masks = ref["masks"] >= 0.5
        boundary = min(float(ref["scores"][-1]) if len(ref["scores"]) == k_max else cut, float(out_scores[-1])
                       if n == k_max else cut) if n or len(ref["scores"]) else cut  # fmt: skip
        used = torch.zeros(n, dtype=torch.bool)
        iou = _box_iou(ref["boxes"], out_boxes) if n and len(ref["boxes"]) else torch.zeros(len(ref["boxes"]), n)
        for i in range(len(ref["boxes"])):
            near = (out_scores - ref["scores"][i]).abs() <= tol["score"]
            cand = torch.where(near & ~used, iou[i], torch.full_like(iou[i], -1.0)) if n else torch.zeros(0)
            j = int(cand.argmax()) if n else -1
            if j < 0 or cand[j] < tol["box_iou"]:
                if abs(float(ref["scores"][i]) - boundary) <= tol["score"]:
                    result.boundary_ties += 1
                else:
                    result.unmatched += 1
                    result.details.append(f"reference row {i} (score {float(ref['scores'][i]):.4f}) has no match")
                continue
            used[j] = True
            result.detections_compared += 1
            result.min_box_iou = min(result.min_box_iou, float(cand[j]))
            result.max_score_diff = max(result.max_score_diff, float((out_scores[j] - ref["scores"][i]).abs()))
            result.min_mask_iou = min(result.min_mask_iou, _mask_iou(ref_masks[i], pasted[j]))
        extra = [j for j in range(n) if not used[j] and abs(float(out_scores[j]) - boundary) > tol["score"]]
        result.unmatched += len(extra)
        result.details.extend(f"exported row {j} (score {float(out_scores[j]):.4f}) has no match" for j in extra)
    return result


def maskrcnn_deploy(model: PersonMaskRCNN, *, topk: int, conf_thresh: float, backend: str) -> MaskRCNNDeploy:
    return MaskRCNNDeploy(model, topk=topk, conf_thresh=conf_thresh, nms=nms_mode(backend)).eval()


class MaskRCNNExport:
    """The export adapter of :class:`~sidnet.models.maskrcnn.PersonMaskRCNN` (see :mod:`sidnet.export.adapters`)."""

    family = "Mask R-CNN"
    precisions = ("fp32",)  # the FP16 rewrite assumes the YOLOv2 head's 'raw' boundary; INT8 is not built
    static_batch = True

    def prepare_random(self, model, *, seed):  # (torchvision's initialisation is usable as it is)
        return model.eval()

    def deploy(self, model, *, conf_thresh, topk, backend):
        return maskrcnn_deploy(model, topk=topk, conf_thresh=conf_thresh, backend=backend)

    def build_graph(self, deploy, *, target, precision, opset):  # (fp32 only)
        return build_maskrcnn_graph(deploy, target=target, opset=opset)

    def metadata(self, model, deploy, *, class_names, conf_thresh, topk):  # (person only; deploy's)
        return metadata(model, deploy)

    def doc_string(self, model):
        return f"SIDNet person Mask R-CNN. {PREPROCESSING} {OUTPUTS}"

    def check_parity(self, deploy, graph, *, batches, seed, tolerance):  # (real images, own tolerance)
        return check_maskrcnn_parity(deploy, graph, images=sample_images(deploy.model.input_size))

    def int8_plugins(self, qdq, deploy):
        raise ExportError("Mask R-CNN has no INT8 export")
