"""Run by torchrun (2 ranks) or plainly (1 process): a real Trainer with MoEBalanceCallback."""

import os
from pathlib import Path

import torch

from moe_balance.integrations.hf import MoEBalanceCallback
from tests.hf_helpers import args, datasets, load, saved_checkpoint


def main(folder: str, out: str, lr: float, per_device_bs: int) -> None:
    from transformers import Trainer
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ckpt = Path(folder)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 and not (ckpt / "config.json").exists():
        saved_checkpoint("mixtral", ckpt)
    train_ds, _ = datasets(n_train=128)
    cb = MoEBalanceCallback(bias_update="sign", bias_update_rate=1e-2, aux_loss="global_batch", write_stats=False)
    if world > 1:
        if not torch.distributed.is_initialized():  # a previous scenario of the same launch made it
            torch.distributed.init_process_group("gloo")
        torch.distributed.barrier()  # rank 0 wrote the checkpoint
    ddp = {"ddp_backend": "gloo"} if world > 1 else {}
    trainer = Trainer(model=load(ckpt), args=args(Path(out), max_steps=5, learning_rate=lr,
                                                  per_device_train_batch_size=per_device_bs, **ddp),
                      train_dataset=train_ds, callbacks=[cb])
    assert trainer.args.world_size == world, (trainer.args.world_size, world)
    trainer.train()
    torch.save({"bias": cb.balancer.bias_LE, "world": trainer.args.world_size, "calls": cb.balancer.reducer.calls,
                "steps": cb.balancer.num_steps}, Path(out) / f"rank{rank}.pt")


if __name__ == "__main__":
    from tests.workers import run_then_exit
    run_then_exit(lambda a: main(a[0], a[1], float(a[2]), int(a[3])))
