"""An Accelerate loop with moe_balance: one added line after ``prepare`` (marked).

    python examples/accelerate_train.py                     # one process, CPU
    torchrun --nproc_per_node 2 examples/accelerate_train.py  # two processes (gloo on CPU)

(``accelerate launch --cpu --num_processes 2`` silently runs one process; use torchrun on CPU.)
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator

from moe_balance.integrations.accelerate import attach
from moe_balance.testing import ByteWindows, batches, skew_routers, stdlib_corpus, tiny_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--accumulate", type=int, default=2)
    args = parser.parse_args()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.accumulate)
    train, _ = stdlib_corpus(max_bytes=3_000_000)
    model = tiny_model("qwen3_moe", vocab_size=256, hidden_size=64, intermediate_size=128)
    skew_routers(model, next(batches(train, 8, 64, seed=9)))
    loader = torch.utils.data.DataLoader(ByteWindows(train, 64, 8 * args.steps * args.accumulate), batch_size=8,
                                         shuffle=True, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    balancer = attach(accelerator, model, optimizer, aux_loss="global_batch")  # <-- added
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients and balancer.num_steps % 25 == 0:
            m = balancer.metrics()
            accelerator.print(f"step {balancer.num_steps:4d}  loss {loss.item():.3f}  "
                              f"MaxVio {m['maxvio_global']:.2f}  dead {m['dead_experts']:.0f}  "
                              f"processes {accelerator.num_processes}")


if __name__ == "__main__":
    main()
