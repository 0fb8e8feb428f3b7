"""Shared pieces of the Lightning tests and workers: a LightningModule around a tiny transformers MoE."""

from __future__ import annotations

import torch

from moe_balance.testing import ByteWindows, batches, skew_routers, stdlib_corpus, tiny_model

import lightning.pytorch as pl


class CausalLM(pl.LightningModule):
    """The transformers model is one attribute among others, as in most user modules."""

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = model
        self.head_note = torch.nn.Linear(2, 2)  # a plain child without routers: must not confuse the search
        self.head_note.requires_grad_(False)  # unused in the loss: DDP would refuse a trainable one
        self.lr = lr

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        self.log("train_loss", loss, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        self.log("val_loss", loss, batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr)


def skewed_model(skew: float = 3.0, seed: int = 0) -> torch.nn.Module:
    train, _ = stdlib_corpus(max_bytes=1_000_000)
    model = tiny_model("mixtral", seed=seed, vocab_size=256)
    if skew:
        skew_routers(model, next(batches(train, 8, 64, seed=9)), strength=skew)
    return model


def loader(n: int = 512, bs: int = 8, seq_len: int = 64, split: str = "train") -> torch.utils.data.DataLoader:
    data, _ = stdlib_corpus(max_bytes=1_000_000 if split == "train" else 300_000, split=split)
    return torch.utils.data.DataLoader(ByteWindows(data, seq_len, n), batch_size=bs, shuffle=False)


def trainer(root, **overrides) -> pl.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(root))
    base.update(overrides)
    return pl.Trainer(**base)
