"""Training, prediction and checkpoint utilities (plain arguments, no Hydra)."""
