"""The two collectives the metrics need, as no-ops when torch.distributed is not running."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``t`` over all ranks ("sum" or "max"), in place unless NCCL needs a GPU copy;
    returns the reduced tensor on ``t``'s device."""
    if world_size() == 1:
        return t
    work = t.cuda() if dist.get_backend() == "nccl" and not t.is_cuda else t
    dist.all_reduce(work, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return work.to(t.device)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (used for variable-size state: pixel lists, bins)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
