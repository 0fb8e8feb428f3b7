"""HF Trainer + MoEBalanceCallback: the one added line is marked below.

    python examples/hf_trainer.py                       # tiny Qwen3-MoE on stdlib bytes, ~1 minute
    python examples/hf_trainer.py --model PATH          # your own (local) MoE checkpoint
    python -m moe_balance plot runs/hf_trainer -o balance.png

Balance metrics appear in the Trainer's logs under ``moe_balance/`` (console, log_history and
any reporter), ``moe_balance.pt`` is saved into every checkpoint folder, and
``trainer.train(resume_from_checkpoint=...)`` continues the bias exactly.
"""

from __future__ import annotations

import argparse
import tempfile

from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from moe_balance.integrations.hf import MoEBalanceCallback
from moe_balance.testing import ByteWindows, batches, skew_routers, stdlib_corpus, tiny_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="local checkpoint folder (default: a tiny skewed Qwen3-MoE)")
    parser.add_argument("--out", default="runs/hf_trainer")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()

    train, _ = stdlib_corpus(max_bytes=3_000_000)
    val, _ = stdlib_corpus(max_bytes=300_000, split="val")
    folder = args.model
    if folder is None:  # play "a downloaded checkpoint": build, skew, save, load back
        folder = tempfile.mkdtemp(prefix="tiny_qwen3_moe_")
        model = tiny_model("qwen3_moe", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4)
        skew_routers(model, next(batches(train, 8, 64, seed=9)))
        model.save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)

    training_args = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=16, learning_rate=1e-3,
        gradient_accumulation_steps=2, logging_steps=max(1, min(25, args.steps // 4)), eval_strategy="steps",
        eval_steps=100,
        save_steps=100, report_to=[], use_cpu=True, lr_scheduler_type="constant")
    trainer = Trainer(
        model=model, args=training_args,
        train_dataset=ByteWindows(train, 64, 20_000), eval_dataset=ByteWindows(val, 64, 128),
        callbacks=[MoEBalanceCallback(aux_loss="global_batch", aux_loss_coef=1e-3)],  # <-- added (bias: quantile)
    )
    trainer.train()
    print({k: round(v, 4) for k, v in trainer.evaluate().items() if "moe_balance" in k or k == "eval_loss"})


if __name__ == "__main__":
    main()
