"""The online fold on two ranks, each with its half of every step's batch (run by core_two_ranks.py)."""

from pathlib import Path

import torch

import moe_balance as mb
from moe_balance.testing import tiny_model


def calibration(n: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (4, 32), generator=gen) for _ in range(n)]


def fold_steps(model, balancer, data: list[torch.Tensor], rank: int | None = None) -> None:
    """Three steps; each step's batch is two calibration batches (a rank takes its one)."""
    for step in range(3):
        pair = data[2 * step:2 * step + 2]
        for ids in (pair if rank is None else pair[rank:rank + 1]):
            model(input_ids=ids).logits.sum().backward()  # a training forward: recorded
        model.zero_grad()
        balancer.step()


def run(out: Path, rank: int) -> None:
    """In an initialized two-rank process group: three fold steps, then the router weights to ``out``.
    Random ids carry little of a constant: the fold runs at any fit (as the test's one-process reference)."""
    mb.fold.MIN_FIT = 0.05
    model = tiny_model("qwen3_moe", vocab_size=256, experts=8)
    balancer = mb.patch(model, fold_share=0.5)  # the default group: WORLD
    calls = balancer.reducer.calls
    fold_steps(model, balancer, calibration(6), rank)
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
    torch.save({"routers": routers, "calls": balancer.reducer.calls - calls}, out / f"rank{rank}.pt")
