"""YOLOv2-family detectors. ``build_model(name, **kwargs)``; names in ``MODELS``."""

from sidnet.models import builders as _builders  # noqa: F401  (registers the builders)
from sidnet.models.layers import Reorg, reorg
from sidnet.models.region import RegionDecode, region_decode, region_topk
from sidnet.models.registry import MODELS, build_model
from sidnet.models.yolo import YOLOv2

__all__ = ["MODELS", "RegionDecode", "Reorg", "YOLOv2", "build_model", "region_decode", "region_topk", "reorg"]
