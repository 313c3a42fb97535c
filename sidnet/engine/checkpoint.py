"""Checkpoints: one self-describing file (weights, EMA, optimizer, RNG, config), written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sidnet.io import atomic_write

FORMAT = "sidnet-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message is one line naming the file and the fix."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` so that a crash mid-write never leaves a truncated file behind."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **state}, f))


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a SIDNet checkpoint; a missing, corrupt or foreign file raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; pass the path of a .pt written by `python -m train`")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001  (pickle/zip errors have many types)
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}); it is corrupt or not a "
                              "torch file — use a checkpoint written by `python -m train`") from e  # fmt: skip
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a SIDNet checkpoint (no format={FORMAT!r}); use one written by "
                              "`python -m train`, or build the model and load weights yourself")  # fmt: skip
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state['version']} > {VERSION}; upgrade sidnet")
    return state


def build_model_from_spec(spec: dict[str, Any], *, initial_weights: bool = True) -> torch.nn.Module:
    """Build the model a checkpoint's ``model`` spec (name, anchors or None, num_classes, input_size, kwargs)
    describes. ``initial_weights=False`` skips the builder's weight files (``pretrained``, ``weights``): the caller
    loads trained weights next."""
    from sidnet.models import build_model

    kwargs = dict(spec["kwargs"])
    if not initial_weights:
        for key in ("pretrained", "weights"):
            if key in kwargs:
                kwargs[key] = None
    if spec.get("anchors") is not None:
        kwargs["anchors"] = spec["anchors"]
    return build_model(spec["name"], num_classes=spec["num_classes"], input_size=spec["input_size"], **kwargs)


def model_from_checkpoint(state: dict[str, Any], *, ema: bool = True) -> torch.nn.Module:
    """Rebuild the model a checkpoint describes and load its (EMA, when present and asked for) weights."""
    model = build_model_from_spec(state["model"], initial_weights=False)
    weights = state.get("ema") if ema and state.get("ema") is not None else state["model_state"]
    model.load_state_dict(weights)
    return model.eval()
