"""Run under torchrun (2 ranks): the online fold through a real DeepSpeed engine in bf16, ZeRO stage 2 or 3.

Usage: ds_fold_run.py OUT STAGE

A tiny skewed Qwen3-MoE (generic routers, no bias buffer of their own) trains with the default Quantile
Balancing and ``fold_share=0.5``. DeepSpeed keeps fp32 master weights and writes them into the bf16 model
after every step, so the fold must edit both copies. After every step each rank records a digest of its
fp32 master router weights (``safe_get_full_fp32_param``) and of its bf16 ones; at the end the remainder is
shipped (``export.ship``), the patched model's loss and MaxVio are measured on held-out batches and rank 0
saves the gathered model for a stock load. Writes OUT/rank<r>.json.
"""

import hashlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

import deepspeed

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # keep op JIT builds out of tests

import moe_balance as mb  # noqa: E402
from moe_balance import export  # noqa: E402
from moe_balance.integrations import deepspeed as mb_ds  # noqa: E402
from moe_balance.testing import batches, skew_routers, stdlib_corpus, tiny_model  # noqa: E402

STEPS, MICRO_BS, SEQ = 12, 4, 64


def digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def routers(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]


def full_lp(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    with deepspeed.zero.GatheredParameters(params):  # a no-op below stage 3
        return [p.detach().clone() for p in params]


def main(out: Path, stage: int) -> None:
    from deepspeed.utils import safe_get_full_fp32_param
    # A random-init model's router inputs explain a constant only to R^2 0.5-0.9 in these 12 steps: fold at any
    # fit, so that every step edits both copies (what this checks), not a few large deferred folds.
    mb.fold.MIN_FIT = 0.05
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, f"expected 2 ranks, got {world}"
    train, _ = stdlib_corpus(max_bytes=400_000)
    val, _ = stdlib_corpus(max_bytes=200_000, split="val")
    model = tiny_model("qwen3_moe", vocab_size=256, experts=8)
    skew_routers(model, train[:512].reshape(8, 64), strength=3.0)
    start = [p.detach().clone() for p in routers(model)]
    config = {"train_micro_batch_size_per_gpu": MICRO_BS, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "bf16": {"enabled": True}, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
              "moe_balance": {"fold_share": 0.5}}
    engine, _, _, _ = mb_ds.initialize(model=model, config=config, model_parameters=model.parameters())
    assert engine.zero_optimization_stage() == stage and engine.bfloat16_enabled()
    bal = mb_ds.balancer(engine)
    assert bal.router_dim is not None, "the fold is not on"
    stream = batches(train, MICRO_BS, SEQ, seed=rank)
    masters, lows = [], []
    for _ in range(STEPS):
        ids = next(stream)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        params = routers(engine.module)
        masters.append(digest([safe_get_full_fp32_param(p) for p in params]))
        lows.append(digest(full_lp(engine.module, params)))
    params = routers(engine.module)
    master = [safe_get_full_fp32_param(p) for p in params]
    low = full_lp(engine.module, params)
    result = {"world": world, "stage": stage, "masters": masters, "lows": lows, "num_steps": bal.num_steps,
              "fold_fit": bal.metrics()["fold_fit"], "bias_abs_max": float(bal.bias_LE.abs().max()),
              "calls": bal.reducer.calls,
              # the bf16 model follows the fp32 master (up to rounding twice): the fold went into both copies
              # largest gap between the bf16 routers and their fp32 master, in units of the master's magnitude
              "low_master_gap": max(float(((m - lp.float()).abs() / m.abs().clamp_min(1e-3)).max())
                                    for m, lp in zip(master, low)),
              "moved": [float((m - s).abs().max()) for m, s in zip(master, start)]}
    held = [next(batches(val, 8, 128, seed=100 + i)) for i in range(4)]
    engine.eval()
    # folds the remainder along the online direction (no gather); measured where the weights are whole
    shipped = export.ship(engine.module, held)
    result["shipped_agreement"] = shipped["topk_agreement"]
    result["bias_after_ship"] = float(bal.bias_LE.abs().max())
    trained = export.routing_report(engine.module, held)
    result["trained_loss"] = trained["loss"]
    result["trained_maxvio"] = sum(trained["maxvio_L"]) / len(trained["maxvio_L"])
    result["final_master"] = digest([safe_get_full_fp32_param(p) for p in routers(engine.module)])
    mb.unpatch(engine.module)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        if rank == 0:
            engine.module.to(torch.float32).save_pretrained(out / "saved", safe_serialization=True)
    torch.save(held, out / "held.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    engine.destroy()


if __name__ == "__main__":
    from tests.workers import run_then_exit
    run_then_exit(lambda a: main(Path(a[0]), int(a[1])))
