"""Shared by the TensorBoard and W&B tests: a short Accelerate run with the balancer attached."""

from __future__ import annotations

import pytest
import torch


def tracked_accelerate_run(tmp_path, log_with: str, project: str) -> None:
    """Train a tiny Mixtral for 6 steps under ``Accelerator(log_with=...)`` with heatmaps every 2nd log."""
    accelerate = pytest.importorskip("accelerate")
    from moe_balance.integrations.accelerate import attach
    from moe_balance.testing import ByteWindows, stdlib_corpus, tiny_model
    acc = accelerate.Accelerator(cpu=True, log_with=log_with, project_dir=str(tmp_path))
    acc.init_trackers(project)
    train, _ = stdlib_corpus(max_bytes=300_000)
    model = tiny_model("mixtral", vocab_size=256)
    loader = torch.utils.data.DataLoader(ByteWindows(train, 32, 24), batch_size=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt, loader = acc.prepare(model, opt, loader)
    attach(acc, model, opt, bias_update="sign", log_every=2, heatmap_every=2)
    for batch in loader:
        acc.backward(model(input_ids=batch["input_ids"], labels=batch["labels"]).loss)
        opt.step()
        opt.zero_grad()
    acc.end_training()
