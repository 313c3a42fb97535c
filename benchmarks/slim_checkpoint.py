"""Write a slim copy of a training checkpoint: the EMA weights as the model, no optimizer/scaler/RNG state.

usage: python benchmarks/slim_checkpoint.py IN.pt OUT.pt

The result is a plain SIDNet checkpoint (loads with ``load_checkpoint``, evaluates and exports like the original)
that cannot resume training; it is what the INT8 benchmark and deployment use (a few MiB instead of ~3x that).
"""

from __future__ import annotations

import sys

from sidnet.checkpoint import load_checkpoint, save_checkpoint

KEEP = ("model", "epoch", "step", "best_ap50", "history", "config", "metrics")


def main(src: str, dst: str) -> None:
    state = load_checkpoint(src)
    weights = state.get("ema") if state.get("ema") is not None else state["model_state"]
    slim = {k: state[k] for k in KEEP if k in state}
    slim.update(model_state={k: v.detach().clone() for k, v in weights.items()}, ema=None, slim_of=str(src))
    save_checkpoint(slim, dst)


if __name__ == "__main__":
    main(*sys.argv[1:3])
