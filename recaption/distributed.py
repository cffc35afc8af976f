"""Which worker am I? Rank and world size from options, SLURM arrays or torchrun."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Return ``(rank, world_size)`` for shard assignment.

    Precedence: explicit options; a SLURM job array (``SLURM_ARRAY_TASK_ID`` relative to
    ``SLURM_ARRAY_TASK_MIN``, over ``SLURM_ARRAY_TASK_COUNT``), combined with torchrun's
    ``RANK``/``WORLD_SIZE`` when both are set (torchrun inside each array task); torchrun
    alone; else ``(0, 1)``.
    """
    if rank is not None or world_size is not None:
        r, w = rank or 0, world_size or 1
    else:
        task = _env_int("SLURM_ARRAY_TASK_ID")
        count = _env_int("SLURM_ARRAY_TASK_COUNT")
        t_rank, t_world = _env_int("RANK"), _env_int("WORLD_SIZE")
        if task is not None and count:
            r, w = task - (_env_int("SLURM_ARRAY_TASK_MIN") or 0), count
            if t_rank is not None and t_world:
                r, w = r * t_world + t_rank, w * t_world
        elif t_rank is not None and t_world:
            r, w = t_rank, t_world
        else:
            r, w = 0, 1
    if w < 1 or not 0 <= r < w:
        raise ValueError(
            f"rank {r} is outside world size {w}: check --rank/--world-size "
            "or the SLURM/torchrun environment"
        )
    return r, w


def local_rank() -> int:
    """This process's GPU index on its node (torchrun's LOCAL_RANK, else SLURM_LOCALID)."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = _env_int(name)
        if value is not None:
            return value
    return 0


def default_device() -> str:
    """``cuda:$LOCAL_RANK`` when CUDA is available, else ``cpu``."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{local_rank() % max(torch.cuda.device_count(), 1)}"
    return "cpu"
