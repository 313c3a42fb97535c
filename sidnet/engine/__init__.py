"""Training workflow: trainer, per-family tasks, EMA, run lock (plain arguments, no Hydra)."""
