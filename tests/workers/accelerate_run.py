"""Run under torchrun (2 ranks) or plainly: an Accelerate loop with moe_balance attached."""

from pathlib import Path

import torch
from accelerate import Accelerator

from moe_balance.integrations.accelerate import attach
from moe_balance.testing import ByteWindows, batches, skew_routers, stdlib_corpus, tiny_model


def main(out: str, per_device_bs: int, ga: int, steps: int, lr: float) -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ga)
    train, _ = stdlib_corpus(max_bytes=1_000_000)
    model = tiny_model("mixtral", vocab_size=256)
    skew_routers(model, next(batches(train, 8, 64, seed=9)))
    loader = torch.utils.data.DataLoader(ByteWindows(train, 64, 512), batch_size=per_device_bs, shuffle=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    balancer = attach(accelerator, model, optimizer, bias_update="sign", bias_update_rate=1e-2,
                      aux_loss="global_batch")
    micro = 0
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        micro += 1
        if micro == steps * ga:
            break
    torch.save({"bias": balancer.bias_LE, "world": accelerator.num_processes, "steps": balancer.num_steps,
                "calls": balancer.reducer.calls}, Path(out) / f"rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    from tests.workers import run_then_exit
    run_then_exit(lambda a: main(a[0], int(a[1]), int(a[2]), int(a[3]), float(a[4])))
