"""Shared pieces of the HF Trainer tests: a tiny saved-and-reloaded checkpoint and a Trainer."""

from __future__ import annotations

from pathlib import Path

import torch

from moe_balance.testing import ByteWindows, batches, skew_routers, stdlib_corpus, tiny_model


def saved_checkpoint(model_type: str, folder: Path, skew: float = 3.0, seed: int = 0) -> Path:
    """Build a tiny skewed model from a config, save it, return the folder ("a download")."""
    from transformers import AutoModelForCausalLM  # noqa: F401  (fail early without transformers)
    train, _ = stdlib_corpus(max_bytes=1_000_000)
    model = tiny_model(model_type, seed=seed, vocab_size=256)
    if skew:
        skew_routers(model, next(batches(train, 8, 64, seed=9)), strength=skew)
    model.save_pretrained(folder)
    return folder


def load(folder: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder)


def datasets(n_train: int = 512, seq_len: int = 64):
    train, _ = stdlib_corpus(max_bytes=2_000_000)
    val, _ = stdlib_corpus(max_bytes=300_000, split="val")
    return ByteWindows(train, seq_len, n_train), ByteWindows(val, seq_len, 64)


def args(out: Path, **overrides):
    from transformers import TrainingArguments
    base = dict(output_dir=str(out), per_device_train_batch_size=8, per_device_eval_batch_size=16,
                learning_rate=1e-3, max_steps=20, logging_steps=10, save_strategy="no", report_to=[],
                use_cpu=True, seed=0, data_seed=0, lr_scheduler_type="constant", dataloader_num_workers=0,
                disable_tqdm=True)
    base.update(overrides)
    return TrainingArguments(**base)


class GradCapture:
    """A TrainerCallback that records router gradients just before each optimizer step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Capture(TrainerCallback):
            def __init__(self):
                self.grads: list[dict[str, torch.Tensor]] = []

            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                                   if ("gate" in n or "router" in n) and p.grad is not None})
        return _Capture()
