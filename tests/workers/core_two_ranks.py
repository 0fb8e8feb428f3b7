"""Run by torchrun: each rank routes its half of every global batch through one Balancer.

``core_two_ranks.py OUT SCENARIO...`` runs each scenario (a bias rule, or ``fold``: the online fold of
:mod:`tests.workers.fold_two_ranks`) in turn in one process group, writing ``OUT/<scenario>/rank<r>.pt``.
"""

from pathlib import Path

import torch
import torch.distributed as dist

import moe_balance as mb
from moe_balance.testing import SkewedRouter

STEPS, E, K, T = 6, 8, 2, 512


def rule_run(out: Path, rule: str, rank: int) -> None:
    bal = mb.Balancer(num_layers=2, num_experts=E, top_k=K, aux_loss="global_batch", z_loss_coef=1e-3,
                      bias_update=rule)
    routers = [SkewedRouter(num_tokens=T, num_experts=E, top_k=K, seed=layer) for layer in range(2)]
    grads = []
    for _ in range(STEPS):
        for layer, router in enumerate(routers):
            logits, idx = router.route(bal.bias_LE[layer])  # same global batch on every rank
            half = slice(rank * T // 2, (rank + 1) * T // 2)
            mine = logits[half].clone().requires_grad_(True)
            bal.observe(layer, mine, idx[half], selection_scores=torch.softmax(logits[half].detach(), -1))
            bal.loss().backward()
            grads.append(mine.grad)
        bal.step()
    torch.save({"bias": bal.bias_LE, "calls": bal.reducer.calls, "grads": grads,
                "metrics": bal.metrics()}, out / f"rank{rank}.pt")


def main(out_dir: str, *scenarios: str) -> None:
    # One process group for every scenario: a second init_process_group after destroy hung a rank.
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, f"expected 2 ranks, got {world}"
    for scenario in scenarios:
        out = Path(out_dir) / scenario
        out.mkdir(parents=True, exist_ok=True)
        if scenario == "fold":
            from tests.workers.fold_two_ranks import run
            run(out, rank)
        else:
            rule_run(out, scenario, rank)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from tests.workers import run_then_exit
    run_then_exit(lambda a: main(*a))
