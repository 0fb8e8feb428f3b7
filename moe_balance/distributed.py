"""The one collective of a step: a SUM all-reduce of one stacked fp64 tensor."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed(group: object | None = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class StepReducer:
    """Sums a flat tensor over ``group``; counts its calls (tests assert one per step)."""

    def __init__(self, group: object | None = None) -> None:
        self.group = group
        self.calls = 0

    def all_reduce_sum(self, flat: torch.Tensor) -> torch.Tensor:
        if not is_distributed(self.group):
            return flat
        self.calls += 1
        work = flat.clone()
        dist.all_reduce(work, op=dist.ReduceOp.SUM, group=self.group)
        return work

    def sum_parts(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Several tensors (one dtype) summed in one all-reduce; new tensors, the inputs are left as they are."""
        flat = self.all_reduce_sum(torch.cat([p.reshape(-1) for p in parts]))
        return [chunk.reshape(p.shape) for chunk, p in zip(flat.split([p.numel() for p in parts]), parts)]

    def world_size(self) -> int:
        return dist.get_world_size(self.group) if is_distributed(self.group) else 1
