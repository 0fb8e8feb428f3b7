"""Run by torchrun (2 ranks): ZeRO-3 end to end, the weights created partitioned under ``zero.Init``.

Usage: zero3_run.py OUT MODE [--steps N] [--rate U]
MODE "ds": ``moe_balance.integrations.deepspeed.initialize`` on a tiny AFMoE loaded by ``from_pretrained``
    while ``HfDeepSpeedConfig`` (stage 3) is alive. AFMoE's selection bias ``expert_bias`` is a frozen
    ``nn.Parameter``, which ZeRO-3 partitions like any weight.
MODE "hf": HF Trainer + MoEBalanceCallback on a tiny DeepSeek-V3 (``e_score_correction_bias`` buffers),
    ``TrainingArguments(deepspeed=<stage-3 dict>)`` created *before* ``from_pretrained``.

Each mode trains three times in this process on the same seed and data: "full" (balanced, checkpoint
half way), "resumed" (a fresh partitioned model restored from that checkpoint) and "control"
(``bias_update="none"``: measured, not balanced). Parameters are compared whole (gathered with
``deepspeed.zero.GatheredParameters``). Writes OUT/rank<r>.json.
"""

import torch._dynamo  # noqa: F401  (before zero.Init patches tensor construction)

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import deepspeed

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # keep op JIT builds out of tests

import moe_balance as mb  # noqa: E402
from moe_balance.integrations import deepspeed as mb_ds  # noqa: E402
from moe_balance.testing import ByteWindows, batches, stdlib_corpus, tiny_model  # noqa: E402

NATIVE = ("e_score_correction_bias", "expert_bias")
ROUTER_WEIGHTS = ("mlp.gate.weight", "mlp.router.gate.weight")
ZERO3 = {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_model_persistence_threshold": 0,
         "stage3_gather_16bit_weights_on_model_save": True}
MICRO_BS, SEQ = 8, 64


# ----------------------------------------------------------------------------- checkpoint
@torch.no_grad()
def skew(model: torch.nn.Module, sample: torch.Tensor, strength: float = 1.5) -> None:
    """Make every router prefer low-numbered experts (``testing.skew_routers`` for routers whose
    weight sits on a child ``gate`` Linear, as AFMoE's)."""
    routers = [dict(model.named_modules())[r["name"]] for r in mb.find_routers(model)]
    holders = [r if isinstance(getattr(r, "weight", None), torch.Tensor) else r.gate for r in routers]
    for holder in holders:  # AFMoE starts its routers at zero: every token would rank experts alike
        if not holder.weight.any():
            holder.weight.normal_(0.0, model.config.initializer_range)
    means = {}
    hooks = [r.register_forward_pre_hook(
        lambda m, args, i=i: means.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]).float().mean(0)))
        for i, r in enumerate(routers)]
    model(input_ids=sample)
    for h in hooks:
        h.remove()
    for i, holder in enumerate(holders):
        weight = holder.weight
        direction = means[i] / means[i].pow(2).sum()
        weight += torch.linspace(strength, -strength, weight.shape[0])[:, None] * direction[None, :]


def save_checkpoint(model_type: str, folder: Path) -> None:
    """A tiny skewed model whose native selection biases start non-zero (patch must read them)."""
    extra = {"num_dense_layers": 0} if model_type == "afmoe" else {}
    model = tiny_model(model_type, vocab_size=256, **extra)
    train, _ = stdlib_corpus(max_bytes=1_000_000)
    skew(model, next(batches(train, 8, SEQ, seed=9)))
    with torch.no_grad():
        for module in model.modules():
            for attr in NATIVE:
                if isinstance(getattr(module, attr, None), torch.Tensor):
                    getattr(module, attr).copy_(torch.linspace(-0.01, 0.01, 8))
    model.save_pretrained(folder)


# ----------------------------------------------------------------------------- inspection
def partitioned(model: torch.nn.Module) -> bool:
    """Every parameter is a ZeRO-3 shard placeholder right now (shape [0], full size in ds_numel)."""
    return all(hasattr(p, "ds_id") and p.numel() == 0 and p.ds_numel > 0 for p in model.parameters())


def gathered_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {name: p.detach().clone() for name, p in model.named_parameters()}


def native_biases(model: torch.nn.Module) -> list[list[float]]:
    found = [getattr(m, a) for m in model.modules() for a in NATIVE if isinstance(getattr(m, a, None), torch.Tensor)]
    with deepspeed.zero.GatheredParameters([t for t in found if hasattr(t, "ds_id")]):
        return [t.detach().float().reshape(-1).tolist() for t in found]


def digest(params: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].float().numpy().tobytes())
    return h.hexdigest()


def changes(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], model: torch.nn.Module) -> dict:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    unchanged = sorted(n for n in trainable if torch.equal(before[n], after[n]))
    return {"unchanged": unchanged, "routers": sorted(n for n in trainable if n.endswith(ROUTER_WEIGHTS)),
            "trainable": len(trainable), "full_shapes": all(after[n].numel() > 0 for n in after)}


def world_group_info(group) -> dict:
    return {"group_is_world": group is None or group is dist.group.WORLD,
            "group_size": dist.get_world_size(group)}


# ----------------------------------------------------------------------------- mb_ds.initialize
def ds_config(balanced: bool, rate: float) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO_BS, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "zero_optimization": dict(ZERO3), "steps_per_print": 10**9,
            "moe_balance": {"bias_update": "sign" if balanced else "none", "bias_update_rate": rate}}


def run_ds(ckpt: Path, out: Path, steps: int, rate: float, balanced: bool, save_at: int = 0,
           load: str | None = None) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    rank, world = dist.get_rank(), dist.get_world_size()
    config = ds_config(balanced, rate)
    keep_alive = HfDeepSpeedConfig(config)  # from_pretrained builds under zero.Init while this lives
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    built_partitioned = partitioned(model)
    start = gathered_params(model)
    engine, _, _, _ = mb_ds.initialize(model=model, config=config,
                                       model_parameters=[p for p in model.parameters() if p.requires_grad])
    del keep_alive
    bal = mb_ds.balancer(engine)
    master_at_patch = bal.bias_LE.tolist()  # read from the partitioned expert_bias by patch()
    if load:
        engine.load_checkpoint(load)
    train, _ = stdlib_corpus(max_bytes=1_000_000)
    data = ByteWindows(train, SEQ, 100_000)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1)).tolist()
    losses = {}
    while bal.num_steps < steps:
        start_i = (bal.num_steps * world + rank) * MICRO_BS  # the same stream after a load
        ids = torch.stack([data[i]["input_ids"] for i in order[start_i:start_i + MICRO_BS]])
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses[bal.num_steps] = float(loss.detach())
        if save_at and bal.num_steps == save_at:
            engine.save_checkpoint(str(out / "ckpt"), tag="half")
    outside_forward = partitioned(model)
    held = measure_ds(engine, bal)
    end = gathered_params(model)
    result = {"world": world, "built_partitioned": built_partitioned, "partitioned_after": outside_forward,
              "master_at_patch": master_at_patch, "losses": losses, "num_steps": bal.num_steps,
              "bias": bal.bias_LE.tolist(), "native": native_biases(model), "heldout": held,
              "changes": changes(start, end, model), "digest": digest(end), "calls": bal.reducer.calls,
              "group_is_engine_dp": bal.reducer.group is not None
              and bal.reducer.group is mb_ds.data_parallel_group(engine), **world_group_info(bal.reducer.group)}
    mb.unpatch(model)  # gives the partitioned expert_bias its checkpoint values back
    result["native_unpatched"] = native_biases(model)
    engine.destroy()
    return result


@torch.no_grad()
def measure_ds(engine, bal) -> dict:
    val, _ = stdlib_corpus(max_bytes=300_000, split="val")
    held = batches(val, 16, SEQ, seed=5 + dist.get_rank())
    engine.eval()
    with bal.measuring():
        for _ in range(4):
            engine(input_ids=next(held))
    engine.train()
    return bal.metrics()


# ----------------------------------------------------------------------------- HF Trainer
def trainer_args(out: Path, steps: int):
    from tests.hf_helpers import args
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}},
          "zero_optimization": dict(ZERO3), "steps_per_print": 10**9}
    return args(out, deepspeed=ds, max_steps=steps, save_strategy="steps", save_steps=steps // 2, logging_steps=1,
                per_device_train_batch_size=MICRO_BS, ddp_backend="gloo")


def run_hf(ckpt: Path, out: Path, steps: int, rate: float, balanced: bool, resume: str | None = None) -> dict:
    from transformers import Trainer
    from transformers.integrations import is_deepspeed_zero3_enabled

    from moe_balance.integrations.hf import MoEBalanceCallback
    from tests.hf_helpers import datasets, load
    training_args = trainer_args(out, steps)  # first: what makes from_pretrained build under zero.Init
    model = load(ckpt)
    built_partitioned = partitioned(model)
    start = gathered_params(model)
    cb = MoEBalanceCallback(bias_update="sign" if balanced else "none", bias_update_rate=rate, write_stats=False)
    train_ds, val_ds = datasets(n_train=steps * MICRO_BS * 2)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=val_ds, callbacks=[cb])
    master_at_patch = cb.balancer.bias_LE.tolist()
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.is_deepspeed_enabled and is_deepspeed_zero3_enabled(), "the Trainer did not run ZeRO-3"
    driver = trainer._moe_balance_callback
    bal = driver.balancer
    outside_forward = partitioned(trainer.model)
    metrics = trainer.evaluate()
    held = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("eval_moe_balance/")}
    end = gathered_params(trainer.model)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    result = {"world": trainer.args.world_size, "built_partitioned": built_partitioned,
              "partitioned_after": outside_forward, "master_at_patch": master_at_patch, "losses": losses,
              "num_steps": bal.num_steps, "bias": bal.bias_LE.tolist(), "native": native_biases(trainer.model),
              "heldout": held, "changes": changes(start, end, trainer.model), "digest": digest(end),
              "calls": bal.reducer.calls, "zero_stage": trainer.deepspeed.zero_optimization_stage(),
              "group_is_engine_dp": bal.reducer.group is not None
              and bal.reducer.group is mb_ds.data_parallel_group(trainer.deepspeed),
              **world_group_info(bal.reducer.group)}
    saved = out / f"checkpoint-{steps}" / "model.safetensors"
    if saved.exists():  # what stock transformers loads: the trained native bias must be in it
        from safetensors.torch import load_file
        tensors = load_file(str(saved))
        result["saved_native"] = [tensors[k].float().tolist() for k in sorted(tensors) if k.endswith(NATIVE)]
    return result


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("mode", choices=["ds", "hf"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rate", type=float, default=2e-2)
    a = parser.parse_args(argv)
    out = Path(a.out)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == int(os.environ["WORLD_SIZE"]) == 2, world
    ckpt = out / "model"
    if rank == 0:
        save_checkpoint("afmoe" if a.mode == "ds" else "deepseek_v3", ckpt)
    dist.barrier()
    half = a.steps // 2
    if a.mode == "ds":
        full = run_ds(ckpt, out / "full", a.steps, a.rate, True, save_at=half)
        resumed = run_ds(ckpt, out / "resumed", a.steps, a.rate, True, load=str(out / "full" / "ckpt"))
        control = run_ds(ckpt, out / "control", a.steps, a.rate, False)
    else:
        full = run_hf(ckpt, out / "full", a.steps, a.rate, True)
        resumed = run_hf(ckpt, out / "full", a.steps, a.rate, True, resume=str(out / "full" / f"checkpoint-{half}"))
        control = run_hf(ckpt, out / "control", a.steps, a.rate, False)
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "full": full, "resumed": resumed,
                                                      "control": control}))


if __name__ == "__main__":
    from tests.workers import run_then_exit
    run_then_exit(main)
