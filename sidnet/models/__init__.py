"""YOLOv2-family detectors and the person Mask R-CNN. ``build_model(name, **kwargs)``; names in ``MODELS``."""

from sidnet.models import builders as _builders  # noqa: F401  (registers the builders)
from sidnet.models import maskrcnn as _maskrcnn  # noqa: F401  (registers maskrcnn)
from sidnet.models.layers import Reorg, reorg
from sidnet.models.maskrcnn import PersonMaskRCNN
from sidnet.models.region import RegionDecode, region_decode, region_topk
from sidnet.models.registry import MODELS, build_model
from sidnet.models.yolo import YOLOv2

__all__ = ["MODELS", "PersonMaskRCNN", "RegionDecode", "Reorg", "YOLOv2", "build_model", "region_decode", "region_topk",
           "reorg"]  # fmt: skip
