"""Shipping what was trained: absorption, hand-over and the fold (moe_balance.export)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import moe_balance as mb
from moe_balance import export
from moe_balance.testing import tiny_model


def _ids(seed: int, n: int = 4, B: int = 4, S: int = 32, vocab: int = 256) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (B, S), generator=gen) for _ in range(n)]


def _random_bias(balancer, scale: float, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    bias = torch.randn(balancer.bias_LE.shape, generator=gen) * scale
    balancer.bias_LE.copy_(bias - bias.mean(-1, keepdim=True))


def test_absorption_gradient_is_minus_coef_times_bias_per_real_token():
    bal = mb.Balancer(num_layers=1, num_experts=4, top_k=2, bias_absorb_coef=0.5)
    bal.bias_LE[0] = torch.tensor([0.3, -0.1, -0.4, 0.2])
    logits = torch.randn(6, 4, requires_grad=True)
    mask = torch.tensor([1, 1, 0, 1, 1, 0])
    idx = (logits.detach().log_softmax(-1) + bal.bias_LE[0]).topk(2).indices
    bal.observe(0, logits, idx, mask=mask, selection_scores=logits.detach().log_softmax(-1))
    bal.loss().backward()
    expected = -0.5 * bal.bias_LE[0][None, :] * mask[:, None].float() / mask.sum()
    torch.testing.assert_close(logits.grad, expected)


def test_absorption_needs_a_bias_in_logit_space():
    with pytest.raises(ValueError, match="bias_absorb_coef"):
        mb.BalanceConfig(bias_update="sign", bias_absorb_coef=1e-2)  # sign adds its bias to probabilities
    mb.BalanceConfig(bias_update="sign", bias_space="logits", bias_absorb_coef=1e-2)
    with pytest.raises(ValueError, match="handover_fraction"):
        mb.BalanceConfig(handover_fraction=1.5)


def test_hand_over_ramps_the_applied_bias_and_resumes_exactly():
    frozen = dict(bias_update="sign", bias_update_rate=0.0, handover_fraction=0.5)  # the bias itself stays
    bal = mb.Balancer(num_layers=1, num_experts=4, top_k=2, **frozen)
    bal.bias_LE[0] = torch.tensor([0.3, -0.1, -0.4, 0.2])
    assert bal.hand_over(8) == (4, 8)
    scales = []
    for _ in range(8):
        scales.append(float(bal.bias_scale))
        bal.step()
    assert scales == [1, 1, 1, 1, 1, 0.75, 0.5, 0.25]  # steps 0..7; after the 8th: 0
    assert float(bal.bias_scale) == 0 and bool((bal.applied_bias(0) == 0).all())
    resumed = mb.Balancer(num_layers=1, num_experts=4, top_k=2, **frozen)
    bal2 = mb.Balancer(num_layers=1, num_experts=4, top_k=2, **frozen)
    for _ in range(6):
        bal2.step()
    bal2.hand_over(8)
    resumed.load_state_dict(bal2.state_dict())
    assert resumed.handover == (4, 8) and float(resumed.bias_scale) == 0.5
    with pytest.raises(ValueError, match="total_steps"):
        bal.hand_over(0)


def test_patched_model_after_hand_over_is_bit_identical_to_stock():
    model = tiny_model("qwen3_moe", vocab_size=256, experts=8)
    ids = _ids(1, n=1)[0]
    with torch.no_grad():
        stock = model(input_ids=ids).logits
    bal = mb.patch(model, handover_fraction=1.0, bias_absorb_coef=1e-2)
    _random_bias(bal, 2.0)
    with torch.no_grad():
        biased = model(input_ids=ids).logits
    bal.hand_over(1)
    bal.step()
    _random_bias(bal, 2.0)  # the controller's price stays; only what is applied goes
    with torch.no_grad():
        handed = model(input_ids=ids).logits
    assert not torch.equal(biased, stock)
    assert torch.equal(handed, stock)
    mb.unpatch(model)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_fold_keeps_the_trained_choice_and_check_export_rebuilds_it(model_type, tmp_path):
    model = tiny_model(model_type, vocab_size=256, experts=8)
    bal = mb.patch(model)
    _random_bias(bal, 0.5)
    data = _ids(2, n=8)
    trained = export.routing_report(model, data[4:])
    saved_bias = bal.bias_LE.clone()
    bal.bias_LE.zero_()
    dropped = export.agreement(trained["selections"], export.routing_report(model, data[4:])["selections"])
    bal.bias_LE.copy_(saved_bias)
    report = export.fold_bias(model, data[:4], check_batches=data[4:])
    assert set(report.layers) == {0, 1} and bool((bal.bias_LE == 0).all())
    assert all(f.direction_D is not None for f in report.layers.values())
    # random inputs hold little of a constant (fit R^2 ~0.3; trained router inputs 0.96+), still the fold
    # keeps more of the trained choice than dropping the bias does
    assert all(f > d + 0.05 for f, d in zip(report.agreement_L, dropped)), (report.agreement_L, dropped)
    export.save_pretrained(model, tmp_path)
    assert (tmp_path / export.FOLD_FILE).exists()
    mb.unpatch(model)
    check = export.check_export(tmp_path, data[4:])
    # rebuilt from the folder: the trained routing and loss come back (up to float rounding)
    assert abs(check["loss_trained"] - trained["loss"]) < 1e-4
    assert check["topk_agreement_L"] == pytest.approx(report.agreement_L, abs=0.02)


def test_fold_into_a_router_bias_is_exact():
    model = tiny_model("gpt_oss", vocab_size=256, experts=8)
    bal = mb.patch(model)
    _random_bias(bal, 1.0)
    data = _ids(3, n=4)
    report = export.fold_bias(model, data[:2], check_batches=data[2:])
    assert all(f.direction_D is None and f.param.endswith("router.bias") for f in report.layers.values())
    assert report.agreement_L == [1.0, 1.0]


def test_fold_refuses_unpatched_and_probability_space_models():
    model = tiny_model("qwen3_moe", vocab_size=256, experts=8)
    with pytest.raises(ValueError, match="not patched"):
        export.fold_bias(model, _ids(0, n=1))
    mb.patch(model, bias_update="sign")
    with pytest.raises(ValueError, match="bias_space"):
        export.fold_bias(model, _ids(0, n=1))
    mb.unpatch(model)


STOCK_EVAL = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    folder, data = sys.argv[1], torch.load(sys.argv[2], weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    counts = {}
    def hook(name):
        def record(module, args, output):
            idx = output[-1] if isinstance(output, tuple) else output
            counts[name] = counts.get(name, 0) + torch.bincount(idx.reshape(-1), minlength=module.num_experts)
        return record
    for name, module in model.named_modules():
        if type(module).__name__.endswith(("TopKRouter", "Router")) and hasattr(module, "weight"):
            module.num_experts = module.weight.shape[0]
            module.register_forward_hook(hook(name))
    assert counts == {} and any(True for _ in model.parameters())
    losses = []
    with torch.no_grad():
        for ids in data:
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    maxvio = [float(c.max() / c.float().mean() - 1) for c in counts.values()]
    print(json.dumps({"loss": sum(losses) / len(losses), "maxvio": sum(maxvio) / len(maxvio),
                      "imported": "moe_balance" in sys.modules}))
""")


def _stock_eval(folder, data, tmp_path) -> dict:
    """Loss and mean MaxVio of ``folder`` loaded by stock transformers in a fresh process without moe_balance."""
    torch.save(data, tmp_path / "data.pt")
    out = subprocess.run([sys.executable, "-c", STOCK_EVAL, str(folder), str(tmp_path / "data.pt")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    stock = json.loads(out.stdout.strip().splitlines()[-1])
    assert stock["imported"] is False
    return stock


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_hf_trainer_ships_a_model_that_stock_transformers_routes_as_trained(model_type, tmp_path):
    """Train a skewed generic-router model with the callback's default config, save it with
    trainer.save_model, load it in a fresh process that never imports moe_balance."""
    from transformers import Trainer, TrainingArguments

    from moe_balance.integrations.hf import MoEBalanceCallback
    from moe_balance.testing import ByteWindows, skew_routers, stdlib_corpus

    train, _ = stdlib_corpus(max_bytes=300_000)
    model = tiny_model(model_type, vocab_size=256, experts=8)
    skew_routers(model, train[:512].reshape(8, 64), strength=3.0)
    callback = MoEBalanceCallback(heatmap_every=0)  # defaults: absorption, hand-over over the last 30%
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=60, per_device_train_batch_size=8,
                             learning_rate=1e-3, logging_steps=20, report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=ByteWindows(train, 64, 512), callbacks=[callback])
    trainer.train()
    assert callback.export_agreement == 1.0
    assert any("moe_balance/export_topk_agreement" in row for row in trainer.state.log_history)
    data = [train[-20_000 + i * 2048:-20_000 + (i + 1) * 2048].reshape(16, 128) for i in range(4)]
    trained = export.routing_report(model, data)
    trainer.save_model(str(tmp_path / "saved"))
    stock = _stock_eval(tmp_path / "saved", data, tmp_path)
    trained_maxvio = sum(trained["maxvio_L"]) / len(trained["maxvio_L"])
    assert abs(stock["loss"] - trained["loss"]) < 1e-4
    assert abs(stock["maxvio"] - trained_maxvio) < 1e-3 + 0.01 * trained_maxvio


def test_lightning_hand_over_ships_the_trained_routing(tmp_path):
    """Lightning: the hand-over spans the last share of estimated_stepping_batches; at the end the patched
    model applies no bias, so what is saved is what was trained."""
    from moe_balance.integrations.lightning import MoEBalanceCallback
    from tests.lightning_helpers import CausalLM, loader, skewed_model, trainer

    model = skewed_model()
    callback = MoEBalanceCallback(bias_absorb_coef=3e-2, handover_fraction=0.5, heatmap_every=0)
    trainer(tmp_path, max_steps=12, callbacks=[callback]).fit(CausalLM(model), loader(n=96))
    assert callback.balancer.handover == (6, 12) and float(callback.balancer.bias_scale) == 0.0
    assert callback.balancer.bias_LE.abs().max() > 0  # the controller still prices; nothing is applied
    assert callback.export_agreement == 1.0


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_hf_trainer_folds_what_is_applied_at_the_end(model_type, tmp_path):
    """Without a hand-over the callback folds the applied bias at on_train_end, logs the agreement,
    and save_model writes the fold record; check-export rebuilds the trained model from the folder."""
    from transformers import Trainer, TrainingArguments

    from moe_balance.integrations.hf import MoEBalanceCallback
    from moe_balance.testing import ByteWindows, skew_routers, stdlib_corpus

    train, _ = stdlib_corpus(max_bytes=300_000)
    model = tiny_model(model_type, vocab_size=256, experts=8)
    skew_routers(model, train[:512].reshape(8, 64), strength=3.0)
    callback = MoEBalanceCallback(handover_fraction=0.0, heatmap_every=0)  # no hand-over: the fold ships the bias
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=20, per_device_train_batch_size=8,
                             learning_rate=1e-3, logging_steps=10, report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=ByteWindows(train, 64, 256), callbacks=[callback])
    trainer.train()
    bias_before = callback.balancer.fold_report.layers[0].bias_E
    assert bias_before.abs().max() > 0 and bool((callback.balancer.bias_LE == 0).all())
    logged = [row["moe_balance/export_topk_agreement"] for row in trainer.state.log_history
              if "moe_balance/export_topk_agreement" in row]
    assert logged == [callback.export_agreement] and 0.5 < callback.export_agreement <= 1.0
    if model_type == "gpt_oss":  # a router with a linear bias takes the fold exactly (its first layer agrees
        # fully; later layers see inputs changed by the gate weights the fold shifts)
        assert all(f.direction_D is None for f in callback.balancer.fold_report.layers.values())
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / export.FOLD_FILE).exists()
    data = [train[200_000 + i * 2048:200_000 + (i + 1) * 2048].reshape(16, 128) for i in range(4)]
    shipped = export.routing_report(model, data)  # the patched model after the fold applies no bias
    check = export.check_export(tmp_path / "saved", data)
    assert abs(check["loss_stock"] - shipped["loss"]) < 1e-5
    assert check["topk_agreement_min"] > 0.5


def test_plan_handover_skips_frozen_routers_and_rules_without_absorption():
    model = tiny_model("qwen3_moe", vocab_size=256, experts=8)
    bal = mb.patch(model)  # defaults: quantile in logit space, absorption 1e-3, hand-over over the last 30%
    assert bal.config.absorb_coef == 1e-3 and export.plan_handover(model, 100) == (70, 100)
    for site in mb.patching.patch_state_of(model).sites:
        site.module.requires_grad_(False)  # LoRA: the routers cannot learn the bias
    bal.hand_over(100, 0.0)
    with pytest.warns(RuntimeWarning, match="frozen"):
        assert export.plan_handover(model, 100) is None
    assert bal.handover is None and float(bal.bias_scale) == 1.0
    mb.unpatch(model)
    bal = mb.patch(model, bias_update="sign")  # a bias on probabilities: no absorption, so no hand-over
    assert bal.config.absorb_coef == 0 and export.plan_handover(model, 100) is None
    mb.unpatch(model)


def test_deepspeed_entry_reads_the_run_length_from_its_scheduler(tmp_path):
    from moe_balance.integrations.deepspeed import _load_config, _total_steps
    config = {"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 500, "warmup_num_steps": 10}}}
    assert _total_steps(config) == 500
    (tmp_path / "ds.json").write_text(json.dumps(config))
    assert _total_steps(_load_config(str(tmp_path / "ds.json"))) == 500
    assert _total_steps({"train_batch_size": 8}) is None and _total_steps(None) is None


def test_plain_loop_ships_with_the_explicit_calls(tmp_path):
    """A plain loop: plan_handover before, ship and save_pretrained after; stock transformers in a fresh
    process routes the saved folder exactly as the trained model."""
    from moe_balance.testing import batches, skew_routers, stdlib_corpus

    train, _ = stdlib_corpus(max_bytes=300_000)
    model = tiny_model("qwen3_moe", vocab_size=256, experts=8)
    skew_routers(model, train[:512].reshape(8, 64), strength=3.0)
    balancer = mb.patch(model, attach_loss=True)
    assert export.plan_handover(model, 30) == (21, 30)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stream = batches(train, 8, 64, seed=0)
    for _ in range(30):
        ids = next(stream)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step(), optimizer.zero_grad(), balancer.step()
    assert export.ship(model, [next(stream) for _ in range(4)]) == 1.0  # nothing left to fold
    data = [train[-20_000 + i * 2048:-20_000 + (i + 1) * 2048].reshape(16, 128) for i in range(4)]
    trained = export.routing_report(model, data)
    export.save_pretrained(model, tmp_path / "saved")
    stock = _stock_eval(tmp_path / "saved", data, tmp_path)
    assert abs(stock["loss"] - trained["loss"]) < 1e-4
    assert abs(stock["maxvio"] - sum(trained["maxvio_L"]) / len(trained["maxvio_L"])) < 1e-3
    check = export.check_export(tmp_path / "saved", data)
    assert check["topk_agreement_L"] == [1.0, 1.0] and abs(check["loss_diff"]) < 1e-5


def test_native_bias_ships_bit_exact(tmp_path):
    """DeepSeek-V3's router owns e_score_correction_bias: the trained bias is in the saved checkpoint."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("deepseek_v3", vocab_size=256, experts=8)
    balancer = mb.patch(model, attach_loss=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for ids in _ids(5, n=4):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step(), optimizer.zero_grad(), balancer.step()
    assert balancer.bias_LE.abs().max() > 0
    data = _ids(6, n=2)
    trained = export.routing_report(model, data)
    export.save_pretrained(model, tmp_path / "saved")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    buffers = [b for n, b in stock.named_buffers() if n.endswith("e_score_correction_bias")]
    assert len(buffers) == balancer.num_layers
    for layer, buf in enumerate(buffers):
        assert torch.equal(buf, balancer.bias_LE[layer].to(buf.dtype))
    check = export.check_export(tmp_path / "saved", data)
    assert check["topk_agreement_L"] == [1.0] * balancer.num_layers
    assert check["loss_stock"] == pytest.approx(trained["loss"], abs=1e-6)
