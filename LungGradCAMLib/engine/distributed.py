"""The one ``torchrun`` helper: rank, world size and local rank from torchrun's environment, the
process group set up once, and the two collectives training and the batch use."""

from __future__ import annotations

import datetime
import os
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


def torchrun_env() -> Tuple[int, int, int]:
    """(rank, world size, local rank) as ``torchrun`` sets them; (0, 1, 0) in a plain process."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def init_torchrun(backend: Optional[str] = None, timeout: Optional[datetime.timedelta] = None) -> Tuple[int, int, int]:
    """:func:`torchrun_env`, with the process group initialised when there are several processes:
    ``backend`` NCCL where CUDA is available and gloo otherwise, unless given."""
    rank, world, local_rank = torchrun_env()
    if world > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if timeout is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return rank, world, local_rank


def all_sum(values: Sequence[float], device: Any) -> List[float]:
    """``values`` summed over all processes (as they are in a plain process)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    """Wait for every process (nothing in a plain process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
