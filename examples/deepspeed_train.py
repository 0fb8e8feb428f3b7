"""DeepSpeed + moe_balance: a "moe_balance" entry in the config and ``mb_ds.initialize``.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 1 examples/deepspeed_train.py
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/deepspeed_train.py --config examples/ds_config.json

Trains a tiny skewed Mixtral (transformers) with ZeRO-2; balance metrics go to DeepSpeed's CSV
monitor (``runs/deepspeed/moe_balance/``) and the log every ``steps_per_print`` steps.
"""

from __future__ import annotations

import argparse
import json
import logging

import deepspeed
import torch

from moe_balance.integrations import deepspeed as mb_ds
from moe_balance.testing import ByteWindows, batches, skew_routers, stdlib_corpus, tiny_model

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no op JIT build needed on CPU


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="examples/ds_config.json")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    deepspeed.init_distributed(dist_backend="gloo")
    config = json.loads(open(args.config).read())
    train, _ = stdlib_corpus(max_bytes=3_000_000)
    model = tiny_model("mixtral", vocab_size=256, hidden_size=64, intermediate_size=128)
    skew_routers(model, next(batches(train, 8, 64, seed=9)))
    engine, _, loader, _ = mb_ds.initialize(model=model, model_parameters=model.parameters(), config=config,
                                            training_data=ByteWindows(train, 64, 50_000))
    balancer = mb_ds.balancer(engine)
    for batch in loader:
        loss = engine(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        engine.backward(loss)
        engine.step()
        if balancer.num_steps >= args.steps:
            break
    if engine.global_rank == 0:
        m = balancer.metrics()
        print(f"steps {balancer.num_steps}  loss {loss.item():.3f}  MaxVio {m['maxvio_global']:.3f}  "
              f"dead experts {m['dead_experts']:.0f}  ranks {torch.distributed.get_world_size()}")


if __name__ == "__main__":
    main()
