"""Run by torchrun: two ranks fold the same bias, each on its own half of the calibration batches."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import moe_balance as mb
from moe_balance import export
from moe_balance.testing import tiny_model


def calibration(n: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (4, 32), generator=gen) for _ in range(n)]


def bias_for(balancer) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    bias = torch.randn(balancer.bias_LE.shape, generator=gen)
    return bias - bias.mean(-1, keepdim=True)


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, f"expected 2 ranks, got {world}"
    model = tiny_model("qwen3_moe", vocab_size=256, experts=8)
    balancer = mb.patch(model)  # the default group: WORLD
    balancer.bias_LE.copy_(bias_for(balancer))
    data = calibration()
    calls = balancer.reducer.calls
    export.fold_bias(model, data[rank::2])
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
    torch.save({"routers": routers, "calls": balancer.reducer.calls - calls}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    from tests.workers import run_then_exit
    run_then_exit(lambda: main(sys.argv[1]))
