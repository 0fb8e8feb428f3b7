"""Run under torchrun (2 ranks, strategy='ddp') or plainly (1 process): Lightning with MoEBalanceCallback."""

from pathlib import Path

import torch
import torch.distributed as dist

import lightning.pytorch as pl

from moe_balance.integrations.lightning import MoEBalanceCallback
from tests.lightning_helpers import CausalLM, loader, skewed_model, trainer


def main(out: str, per_device_bs: int, steps: int, lr: float) -> None:
    distributed = "LOCAL_RANK" in __import__("os").environ
    pl.seed_everything(0)
    cb = MoEBalanceCallback(bias_update="sign", bias_update_rate=1e-2, aux_loss="global_batch")
    tr = trainer(out, max_steps=steps, callbacks=[cb],
                 **(dict(strategy="ddp", devices=2) if distributed else {}))
    tr.fit(CausalLM(skewed_model(), lr=lr), loader(n=512, bs=per_device_bs))
    world = dist.get_world_size() if dist.is_initialized() else 1
    assert world == tr.world_size
    torch.save({"bias": cb.balancer.bias_LE, "world": world, "steps": cb.balancer.num_steps,
                "calls": cb.balancer.reducer.calls, "strategy": type(tr.strategy).__name__},
               Path(out) / f"rank{tr.global_rank}.pt")


if __name__ == "__main__":
    from tests.workers import run_then_exit
    run_then_exit(lambda a: main(a[0], int(a[1]), int(a[2]), float(a[3])))
