"""Run by torchrun: HF Trainer + MoEBalanceCallback, a full run and a resumed one, on one engine.

Usage: hf_resume.py OUT ENGINE [--restore-callbacks]
ENGINE: "plain" or "zero1"/"zero2"/"zero3" (DeepSpeed through TrainingArguments(deepspeed=dict)).
A tiny DeepSeek-V3 (native e_score_correction_bias) trains 8 steps with a checkpoint at 4; a fresh
Trainer resumes from checkpoint-4. Writes OUT/rank<r>.json with both runs' biases, native biases,
step counts, aux weights and per-step losses.
"""

import argparse
import json
import os
from pathlib import Path

import torch

try:  # keep DeepSpeed's op JIT builds out of tests (the shm comm op costs a fresh machine ~40 s or more)
    import deepspeed
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
except ImportError:
    pass

from moe_balance.integrations.hf import MoEBalanceCallback
from tests.hf_helpers import args, datasets, load, saved_checkpoint


def ds_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}},
            "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}


def run(ckpt: Path, out: Path, engine: str, restore_callbacks: bool, resume: str | None):
    from transformers import Trainer
    extra = {"save_strategy": "steps", "save_steps": 4, "logging_steps": 1, "max_steps": 8,
             "restore_callback_states_from_checkpoint": restore_callbacks}
    if engine.startswith("zero"):
        extra["deepspeed"] = ds_config(int(engine[-1]))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        extra["ddp_backend"] = "gloo"
    cb = MoEBalanceCallback(bias_update="sign", bias_update_rate=1e-2, aux_loss="switch", aux_loss_coef=1e-2,
                            write_stats=False)
    train_ds, _ = datasets(n_train=128)
    trainer = Trainer(model=load(ckpt), args=args(out, **extra), train_dataset=train_ds, callbacks=[cb])
    trainer.train(resume_from_checkpoint=resume)
    if engine.startswith("zero"):
        assert trainer.is_deepspeed_enabled, "the Trainer silently ran without DeepSpeed"
        assert trainer.deepspeed.zero_optimization_stage() == int(engine[-1]), "another ZeRO stage ran"
    driver = trainer._moe_balance_callback  # the callback that drives the patch (rebuilt on restore)
    bal = driver.balancer
    native = [m.e_score_correction_bias.detach().float().reshape(-1).tolist() for m in trainer.model.modules()
              if hasattr(m, "e_score_correction_bias")]
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    logged = [h for h in trainer.state.log_history if "moe_balance/aux_coef" in h]
    return {"bias": bal.bias_LE.tolist(), "num_steps": bal.num_steps, "native": native, "losses": losses,
            "aux_coef": bal.aux_coef.item(), "logged": len(logged), "world": trainer.args.world_size,
            "same_callback": driver is cb}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("engine")
    parser.add_argument("--restore-callbacks", action="store_true")
    a = parser.parse_args(argv)
    out = Path(a.out)
    rank = int(os.environ.get("RANK", "0"))
    ckpt = out / "ckpt"
    if rank == 0:
        saved_checkpoint("deepseek_v3", ckpt)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")
        torch.distributed.barrier()
    full = run(ckpt, out / "full", a.engine, a.restore_callbacks, None)
    resumed = run(ckpt, out / "full", a.engine, a.restore_callbacks, str(out / "full" / "checkpoint-4"))
    (out / f"rank{rank}.json").write_text(json.dumps({"full": full, "resumed": resumed}))


if __name__ == "__main__":
    from tests.workers import run_then_exit
    run_then_exit(main)
