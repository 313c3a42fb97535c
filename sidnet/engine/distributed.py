"""Multi-process (DDP) training: the launch environment ``torchrun`` sets, checked before any collective, and the
process group.

``torchrun --nproc_per_node=N -m train ...`` starts N copies of the entry point with ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. Each process takes ``cuda:LOCAL_RANK``
(NCCL) or the CPU (gloo) and ``batch_size / WORLD_SIZE`` of every global batch. Rank 0 alone writes the run folder
(config, TensorBoard, checkpoints) and evaluates; the others wait at a barrier.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sidnet.config import ConfigError

_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCH = "torchrun --nproc_per_node=N -m train ..."


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: ``rank`` of ``world_size`` (``local_rank`` on its host) on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(device_ids=[self.device.index]) if self.backend == "nccl" else dist.barrier()


def launch_from_env(env: Mapping[str, str], *, device: str, batch_size: int, cuda_devices: int) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from a launch environment, or one-line :class:`ConfigError` when the launch
    cannot work (checked before any process group exists, so every process fails the same way, at once)."""
    world = env.get("WORLD_SIZE")
    if world is None:
        return 0, 1, 0
    try:
        world_size = int(world)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={world!r} is not a number; launch with {LAUNCH}") from None
    if world_size <= 1:
        return 0, 1, 0
    missing = [k for k in _TORCHRUN_VARS if not env.get(k)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world_size} is set but {', '.join(missing)} not: start multi-process "
                          f"training with {LAUNCH} (or unset WORLD_SIZE for one process)")  # fmt: skip
    rank, local_rank = int(env["RANK"]), int(env["LOCAL_RANK"])
    local_world = int(env.get("LOCAL_WORLD_SIZE", world_size))
    if batch_size % world_size:
        fit = world_size * max(1, batch_size // world_size)
        raise ConfigError(f"batch_size={batch_size} is the global batch and must split evenly over {world_size} "
                          f"processes; use a multiple of {world_size}, e.g. batch_size={fit}")  # fmt: skip
    if device.startswith("cuda:"):
        raise ConfigError(f"device={device} with {world_size} processes: each process takes cuda:LOCAL_RANK; use "
                          "device=cuda (or auto), and CUDA_VISIBLE_DEVICES to pick the GPUs")  # fmt: skip
    wants_cuda = device == "cuda" or (device == "auto" and cuda_devices > 0)
    if wants_cuda and local_world > cuda_devices:
        raise ConfigError(f"--nproc_per_node={local_world} but this host has {cuda_devices} visible CUDA device(s); "
                          f"use --nproc_per_node={max(1, cuda_devices)} or device=cpu (gloo)")  # fmt: skip
    return rank, world_size, local_rank


def setup(*, device: str, batch_size: int, timeout_s: int = 1800, env: Mapping[str, str] | None = None) -> DistContext:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU), else a one-process context.
    ``device`` is the config's (auto | cpu | cuda)."""
    env = os.environ if env is None else env
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    rank, world_size, local_rank = launch_from_env(env, device=device, batch_size=batch_size,
                                                   cuda_devices=cuda_devices)  # fmt: skip
    if world_size == 1:
        return DistContext()
    use_cuda = device == "cuda" or (device == "auto" and cuda_devices > 0)
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": dev} if use_cuda else {}))  # fmt: skip
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """The mean over processes of each value (same keys on every rank); unchanged with one process."""
    if not ctx.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return {k: v / ctx.world_size for k, v in zip(keys, t.tolist(), strict=True)}
