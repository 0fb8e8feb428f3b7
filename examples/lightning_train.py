"""A Lightning run with moe_balance: one callback added to the Trainer (marked).

    python examples/lightning_train.py                                        # one process, CPU
    torchrun --nproc_per_node 2 examples/lightning_train.py --devices 2      # DDP, two processes (gloo on CPU)
    tensorboard --logdir lightning_logs                                       # metrics, load heatmap, MaxVio curve

The transformers model is an attribute of the LightningModule; the callback finds it (or pass ``model_attr=``).
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from moe_balance.integrations.lightning import MoEBalanceCallback
from moe_balance.testing import ByteWindows, batches, skew_routers, stdlib_corpus, tiny_model


class CausalLM(pl.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        self.log("val_loss", loss, batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--logdir", default="lightning_logs")
    args = parser.parse_args()
    pl.seed_everything(0)
    train, _ = stdlib_corpus(max_bytes=3_000_000)
    val, _ = stdlib_corpus(max_bytes=300_000, split="val")
    model = tiny_model("qwen3_moe", vocab_size=256, hidden_size=64, intermediate_size=128)
    skew_routers(model, next(batches(train, 8, 64, seed=9)))  # a badly balanced start, to watch it recover
    train_loader = torch.utils.data.DataLoader(ByteWindows(train, 64, 8 * args.steps * args.accumulate),
                                               batch_size=8, shuffle=True)
    val_loader = torch.utils.data.DataLoader(ByteWindows(val, 64, 64), batch_size=16)
    balance = MoEBalanceCallback(bias_update="sign", bias_update_rate=3e-3, aux_loss="global_batch",
                                 heatmap_every=5)  # <-- added
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                         max_steps=args.steps, accumulate_grad_batches=args.accumulate, log_every_n_steps=10,
                         val_check_interval=max(1, args.steps * args.accumulate // 3), callbacks=[balance],
                         logger=TensorBoardLogger(args.logdir, name="moe_balance_demo"), enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(CausalLM(model), train_loader, val_loader)
    if trainer.is_global_zero:
        m = trainer.callback_metrics
        print(f"steps {trainer.global_step}  processes {trainer.world_size}  "
              f"train MaxVio {float(m['moe_balance/maxvio_global']):.2f}  "
              f"val MaxVio {float(m['val_moe_balance/maxvio_global']):.2f}  "
              f"bias |max| {float(m['moe_balance/bias_abs_max']):.3f}  logs in {trainer.logger.log_dir}")


if __name__ == "__main__":
    main()
