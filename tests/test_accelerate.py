"""Accelerate integration with a real Accelerator (CPU), one and two processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_balance.testing import ByteWindows, batches, eval_maxvio, skew_routers, stdlib_corpus, tiny_model

from .conftest import run_single_process, run_torchrun

accelerate = pytest.importorskip("accelerate")
from moe_balance.integrations.accelerate import attach  # noqa: E402

SCRIPT = Path(__file__).parent / "workers" / "accelerate_run.py"


def setup(ga=4, lr=1e-3, n=512, bs=4, shuffle=False):
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ga)
    train, _ = stdlib_corpus(max_bytes=1_000_000)
    model = tiny_model("mixtral", vocab_size=256)
    skew_routers(model, next(batches(train, 8, 64, seed=9)))
    loader = torch.utils.data.DataLoader(ByteWindows(train, 64, n), batch_size=bs, shuffle=shuffle,
                                         generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    return acc, model, opt, loader


def test_bias_updates_once_per_accumulated_step_and_balance_improves():
    acc, model, opt, loader = setup(ga=4, n=4096, shuffle=True)
    model, opt, loader = acc.prepare(model, opt, loader)
    bal = attach(acc, model, opt, bias_update="sign", bias_update_rate=2e-3)
    val, _ = stdlib_corpus(max_bytes=300_000, split="val")
    start = eval_maxvio(acc.unwrap_model(model), bal, val, n_batches=4)
    updates = []
    for batch in loader:
        with acc.accumulate(model):
            acc.backward(model(input_ids=batch["input_ids"], labels=batch["labels"]).loss)
            opt.step()
            opt.zero_grad()
        updates.append(bal.num_steps)
    assert updates[:8] == [0, 0, 0, 1, 1, 1, 1, 2]
    assert bal.num_steps == len(loader) // 4
    assert bal.last_window["tokens_L"].tolist() == [4 * 4 * 64.0] * 2  # 4 micro-batches of 4 x 64
    end = eval_maxvio(acc.unwrap_model(model), bal, val, n_batches=4)
    assert start > 1.0 and end < start * 0.5, (start, end)  # measured here: 2.3 -> ~0.5


def test_balance_loss_is_scaled_for_accumulation():
    acc, model, opt, loader = setup(ga=4)
    model, opt, loader = acc.prepare(model, opt, loader)
    attach(acc, model, opt, aux_loss="switch")
    from moe_balance.patching.api import patch_state_of
    assert patch_state_of(acc.unwrap_model(model)).backward_scale() == 0.25


def test_save_state_load_state_round_trip(tmp_path):
    acc, model, opt, loader = setup(ga=1)
    model, opt, loader = acc.prepare(model, opt, loader)
    bal = attach(acc, model, opt, fold_share=0.0)  # the bias kept beside the weights: its state round-trips
    it = iter(loader)
    for _ in range(3):
        batch = next(it)
        acc.backward(model(input_ids=batch["input_ids"], labels=batch["labels"]).loss)
        opt.step(); opt.zero_grad()
    acc.save_state(str(tmp_path / "state"))
    saved_bias, saved_steps = bal.bias_LE.clone(), bal.num_steps
    for _ in range(2):
        batch = next(it)
        acc.backward(model(input_ids=batch["input_ids"], labels=batch["labels"]).loss)
        opt.step(); opt.zero_grad()
    assert not torch.equal(bal.bias_LE, saved_bias)
    acc.load_state(str(tmp_path / "state"))
    assert torch.equal(bal.bias_LE, saved_bias) and bal.num_steps == saved_steps == 3


def test_default_fold_ships_a_model_stock_transformers_routes_as_trained(tmp_path):
    """Accelerate with the default config: the online fold moves the bias into the router weights after every
    synced step; the saved model, loaded by stock transformers in a fresh process, has the trained loss and
    balance and is far better balanced than the skewed start."""
    from moe_balance import export

    from .test_export import _stock_eval
    acc, model, opt, loader = setup(ga=2, bs=8)
    model, opt, loader = acc.prepare(model, opt, loader)
    bal = attach(acc, model, opt)
    assert bal.config.fold_share_resolved == 1.0 and bal.router_dim is not None
    train, _ = stdlib_corpus(max_bytes=1_000_000)
    data = [train[-20_000 + i * 2048:-20_000 + (i + 1) * 2048].reshape(16, 128) for i in range(3)]
    start = export.routing_report(model, data)
    for batch in loader:
        with acc.accumulate(model):
            acc.backward(model(**batch).loss)
            opt.step()
            opt.zero_grad()
        if bal.num_steps == 30:
            break
    assert bal.metrics()["fold_fit"] > 0.05 and bal.metrics()["routing_differ"] == 0.0
    shipped = export.ship(model, data)
    assert shipped["topk_agreement"] == 1.0 and shipped["maxvio_served"] == shipped["maxvio_trained"]
    trained = export.routing_report(model, data)
    export.save_pretrained(acc.unwrap_model(model), tmp_path / "saved")
    stock = _stock_eval(tmp_path / "saved", data, tmp_path)
    trained_maxvio = sum(trained["maxvio_L"]) / len(trained["maxvio_L"])
    assert abs(stock["loss"] - trained["loss"]) < 1e-4
    assert abs(stock["maxvio"] - trained_maxvio) < 1e-3 + 0.01 * trained_maxvio
    assert stock["maxvio"] < 0.6 * sum(start["maxvio_L"]) / len(start["maxvio_L"]), (stock, start["maxvio_L"])


def test_clear_errors():
    acc, model, opt, loader = setup()
    with pytest.raises(ValueError, match="after prepare"):
        attach(acc, model, opt)
    from transformers import GPT2Config, GPT2LMHeadModel
    dense = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=256))
    dense, opt2 = acc.prepare(dense, torch.optim.SGD(dense.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        attach(acc, dense, opt2)


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_same_global_data(tmp_path):
    run_torchrun(SCRIPT, str(tmp_path), "4", "1", "6", "0.0", nproc=2, timeout=600)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert torch.equal(ranks[0]["bias"], ranks[1]["bias"])
    assert ranks[0]["steps"] == ranks[0]["calls"] == 6
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    from .workers.accelerate_run import main
    run_single_process(main, str(single_dir), 8, 1, 6, 0.0)
    single = torch.load(single_dir / "rank0.pt")
    assert single["world"] == 1
    assert torch.equal(ranks[0]["bias"], single["bias"]) and single["bias"].abs().max() > 0
