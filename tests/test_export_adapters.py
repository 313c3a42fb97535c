"""The export's per-family adapter registry (:mod:`sidnet.export.adapters`): lookup through the class hierarchy,
duplicates refused, an unknown model named in one line. The adapters themselves run in test_export*.py."""

from __future__ import annotations

import pytest
from torch import nn

from sidnet.export import adapters
from sidnet.export.maskrcnn import MaskRCNNExport
from sidnet.graph.errors import ExportError
from sidnet.models import PersonMaskRCNN, YOLOv2


def _bare(cls: type) -> nn.Module:
    return cls.__new__(cls)  # the lookup reads the class only; no weights needed


def test_each_family_has_its_adapter_and_subclasses_inherit_it():
    assert isinstance(adapters.adapter_for(_bare(YOLOv2)), adapters.RegionExport)
    assert isinstance(adapters.adapter_for(_bare(PersonMaskRCNN)), MaskRCNNExport)

    class TinyYOLO(YOLOv2):
        pass

    assert adapters.adapter_for(_bare(TinyYOLO)) is adapters.adapter_for(_bare(YOLOv2))
    assert "int8" in adapters.adapter_for(_bare(YOLOv2)).precisions
    assert adapters.adapter_for(_bare(PersonMaskRCNN)).precisions == ("fp32",)


def test_unknown_model_and_duplicate_registration_are_refused():
    with pytest.raises(ExportError, match=r"best\.pt holds a Linear, which has no export adapter.*YOLOv2 family"):
        adapters.adapter_for(nn.Linear(2, 2), source="best.pt")
    with pytest.raises(ValueError, match="already registered for YOLOv2"):
        adapters.register_adapter(YOLOv2, adapters.RegionExport())
