"""Checkpoints: one self-describing file (weights, EMA, optimizer, RNG, config), written atomically, read as data.

A checkpoint holds tensors and plain containers only (dict, list, tuple, str, int, float, bool, None) and is read with
``torch.load(weights_only=True)``: a ``.pt`` downloaded from anywhere can name no Python callable, so loading it never
runs code (a pickle that tries is refused with one line). Format history:

- version 1 (before 2026-11): numpy arrays inside (``np.random.get_state()``, numpy scalars in metrics). Still read,
  still without running code: the only globals allowed are numpy's array/scalar reconstructors, checked by name
  before anything is unpickled; the next save writes version 2.
- version 2: plain containers and tensors only.

Saving keeps the previous generation only while a write is in flight: ``last.pt`` → ``last.prev.pt`` (a hard link:
no copy, and a complete ``last.pt`` exists at every instant), the new file renamed over ``last.pt``, then
``last.prev.pt`` removed, so a run holds one generation on disk, not two. A writer killed between the rename and the
removal leaves ``last.prev.pt``, which the next save replaces.

Two kinds of file: ``last.pt`` holds everything exact resume needs (weights, EMA, optimizer, scaler, RNG states,
history); ``best.pt`` (:func:`deploy_state`) holds only what evaluation and export read: the EMA weights (conv
weights in float16, which changes no measured AP: see the README), the model description, config and metrics.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sidnet.io import atomic_write
from sidnet.safety import check_input_size

FORMAT = "sidnet-checkpoint"
VERSION = 2
_QUANTIZER_KEY = re.compile(r"(^|\.)(input|weight|output)_quantizer\.")  # modelopt's entries in a QAT state

# Globals a version-1 checkpoint may name: numpy's ndarray/scalar reconstruction, nothing callable beyond it.
_NUMPY_GLOBALS = {
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
}


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message is one line naming the file and the fix."""


def previous_generation(path: str | Path) -> Path:
    """``runs/x/last.pt`` → ``runs/x/last.prev.pt``: the generation kept by :func:`save_checkpoint`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def to_plain(obj: Any) -> Any:
    """Numpy arrays/scalars → lists/numbers, recursively, so ``obj`` loads under ``weights_only=True``."""
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def deploy_state(state: dict[str, Any], *, half: bool = True) -> dict[str, Any]:
    """The part of a training ``state`` that evaluation and export use: the EMA weights (the raw ones when the run
    has no EMA), with floating tensors of rank > 1 (conv/linear weights: nearly all the bytes) in float16 when
    ``half``; biases and BatchNorm statistics stay float32. No optimizer, scaler or RNG: not resumable.
    ``model_from_checkpoint`` loads it into a float32 model (``load_state_dict`` converts)."""
    ema = state.get("ema") is not None
    weights = state["ema"] if ema else state["model_state"]
    if half:
        weights = {k: v.half() if v.is_floating_point() and v.ndim > 1 else v for k, v in weights.items()}
    keep = ("model", "epoch", "step", "best_ap50", "history", "config", "quant", "metrics")
    return {**{k: state[k] for k in keep if k in state}, "model_state": weights, "ema": None,
            "weights": "ema" if ema else "model", "weights_dtype": "float16" if half else "float32"}  # fmt: skip


def save_checkpoint(state: dict[str, Any], path: str | Path, *, keep_previous: bool = True) -> None:
    """Write ``state`` to ``path`` atomically. With ``keep_previous`` the file it replaces stays as
    :func:`previous_generation` (path) until the new one is durable, then is removed (one generation on disk).

    A crash, SIGKILL or full disk at any point leaves a complete ``path`` (old or new) and never a truncated one.
    """
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, **to_plain(state)}
    prev = previous_generation(path)

    def before_replace() -> None:
        if keep_previous and path.is_file():
            tmp = prev.with_name(f".{prev.name}.link")
            tmp.unlink(missing_ok=True)
            os.link(path, tmp)
            os.replace(tmp, prev)

    atomic_write(path, lambda f: torch.save(payload, f), before_replace=before_replace)
    if keep_previous:
        prev.unlink(missing_ok=True)  # the new generation is renamed in and the directory fsynced


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001  (not a zip/pickle at all: the load below reports it as corrupt)
        return []


def _numpy_safe_globals() -> list:
    # numpy 2 moved numpy.core to numpy._core; the tuples below register both names the v1 pickles may use.
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [
        np.ndarray,
        np.dtype,
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
        (multiarray.scalar, "numpy._core.multiarray.scalar"),
        *{type(np.dtype(t)) for t in ("u1", "u4", "i4", "i8", "f4", "f8", "?")},
    ]


def _is_numpy_dtype_class(name: str) -> bool:
    return name.startswith("numpy.dtypes.") and name.endswith("DType")


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a SIDNet checkpoint as data; a missing, corrupt, foreign or code-carrying file raises
    :class:`CheckpointError` with one line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; pass the path of a .pt written by `python -m train`")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes: an interrupted copy?); use another checkpoint"
                              f"{_prev_hint(path)}")  # fmt: skip
    unsafe = _unsafe_globals(path)
    legacy = bool(unsafe) and all(g in _NUMPY_GLOBALS or _is_numpy_dtype_class(g) for g in unsafe)
    if unsafe and not legacy:
        names = ", ".join(sorted(set(unsafe))[:3])
        raise CheckpointError(f"refused {path}: it names Python objects ({names}) that would run code when loaded; "
                              "SIDNet checkpoints hold only tensors and plain data — do not use this file")  # fmt: skip
    try:
        if legacy:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                state = torch.load(path, map_location=map_location, weights_only=True)
        else:
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global|GLOBAL):? *(?:GLOBAL )?([\w.]+)", str(e))
        if found:  # a pickle (not a zip torch file, which the name check above catches) that names a callable
            raise CheckpointError(f"refused {path}: it names Python objects ({found.group(1)}) that would run code "
                                  "when loaded; SIDNet checkpoints hold only tensors and plain data — do not use "
                                  "this file") from e  # fmt: skip
        raise CheckpointError(f"checkpoint {path} cannot be read (not a pickle of plain data); it is corrupt, "
                              "truncated or not a torch file — use a checkpoint written by `python -m train`"
                              f"{_prev_hint(path)}") from e  # fmt: skip
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}); it is corrupt, truncated or "
                              f"not a torch file — use a checkpoint written by `python -m train`"
                              f"{_prev_hint(path)}") from e  # fmt: skip
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a SIDNet checkpoint (no format={FORMAT!r}); use one written by "
                              "`python -m train`, or build the model and load weights yourself")  # fmt: skip
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state['version']} > {VERSION}; upgrade sidnet")
    if state.get("version", 1) < 2:
        state = upgrade_state(state)
    if not isinstance(state.get("model"), dict) or "name" not in state["model"]:
        raise CheckpointError(f"{path} has no model description (state['model']); use a checkpoint written by "
                              "`python -m train`")  # fmt: skip
    return state


def _prev_hint(path: Path) -> str:
    prev = previous_generation(path)
    if prev.is_file() and prev != path:
        return f"; the previous generation {prev} is intact: `cp {prev} {path}` to continue from it"
    return ""


def upgrade_state(state: dict[str, Any]) -> dict[str, Any]:
    """Version 1 → 2: numpy RNG state and numpy scalars → plain containers (same values)."""
    state = dict(state)
    rng = dict(state.get("rng") or {})
    if isinstance(rng.get("numpy"), tuple):
        rng["numpy"] = numpy_rng_to_plain(rng["numpy"])
    state["rng"] = rng
    state = to_plain(state)
    state["version"] = VERSION
    return state


def numpy_rng_to_plain(s: tuple) -> dict[str, Any]:
    """``np.random.get_state()`` → plain dict (keys as an int64 tensor); inverse: :func:`numpy_rng_from_plain`."""
    name, keys, pos, has_gauss, cached = s
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}  # fmt: skip


def numpy_rng_from_plain(d: dict[str, Any]) -> tuple:
    keys = d["keys"].numpy() if isinstance(d["keys"], torch.Tensor) else np.asarray(d["keys"])
    return (d["name"], keys.astype(np.uint32), d["pos"], d["has_gauss"], d["cached_gaussian"])


def fp32_weights(state_dict: dict) -> dict:
    """A QAT model state without its quantizer entries (modelopt's ``*_quantizer.*``): the trained weights, fake
    quantization removed."""
    return {k: v for k, v in state_dict.items() if not _QUANTIZER_KEY.search(k)}


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
    size = check_input_size(spec["input_size"], where="the checkpoint's model.input_size",
                            fix="use a checkpoint written by python -m train")  # before any tensor is sized by it
    return build_model(spec["name"], num_classes=spec["num_classes"], input_size=size, **kwargs)


def model_from_checkpoint(
    state: dict[str, Any],
    *,
    ema: bool = True,
    before_load: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    input_size: int | None = None,
) -> torch.nn.Module:
    """Rebuild the model a checkpoint describes and load its (EMA, when present and asked for) weights.

    ``input_size``: build it for another input side than the one it was trained at (the weights of these fully
    convolutional models do not depend on it; YOLOv2 evaluates one network at 320–608 to trade speed for accuracy).
    The caller checks the value (a multiple of 32) with its own message.

    ``before_load`` turns the built model into the one the weights were saved from before they are loaded (e.g.
    :func:`sidnet.quant.qat.fake_quant_model` inserts a QAT checkpoint's fake quantizers). Without it a QAT checkpoint
    (``state["quant"]``) gives its trained weights with the fake quantization removed (:func:`fp32_weights`)."""
    spec = state["model"] if input_size is None else {**state["model"], "input_size": input_size}
    try:
        model = build_model_from_spec(spec, initial_weights=False)
    except KeyError as e:
        raise CheckpointError(f"checkpoint describes model {spec.get('name')!r}, which this sidnet does not know "
                              f"({e}); upgrade sidnet or use another checkpoint") from e  # fmt: skip
    if not ema and state.get("weights") == "ema":
        raise CheckpointError("this checkpoint (a best.pt) holds only the EMA weights: use the run's last.pt for the "
                              "raw weights, or drop --no-ema / ema=false")  # fmt: skip
    weights = state.get("ema") if ema and state.get("ema") is not None else state["model_state"]
    if before_load is not None:
        model = before_load(model)
    elif state.get("quant"):
        weights = fp32_weights(weights)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint weights do not fit model {spec['name']!r} ({first[:160]}); the file was "
                              "edited or written by another version") from e  # fmt: skip
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    """``python -m sidnet.checkpoint --upgrade FILE...``: re-save version-1 checkpoints as version 2."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m sidnet.checkpoint", description=main.__doc__)
    p.add_argument("--upgrade", nargs="+", type=Path, required=True, metavar="FILE")
    args = p.parse_args(argv)
    for path in args.upgrade:
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            raise SystemExit(f"error: {e}") from None
        state = {k: v for k, v in state.items() if k not in ("format", "version")}
        save_checkpoint(state, path, keep_previous=False)
        print(f"{path}: version {VERSION}")


if __name__ == "__main__":
    main()
