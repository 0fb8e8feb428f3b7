"""Shipping what was trained: the online fold (moe_balance.fold) and the end fold (moe_balance.export)."""

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


@pytest.fixture
def fold_at_any_fit(monkeypatch):
    """Random tiny models on random ids carry little of a constant (fit 0.03-0.4; trained routers' inputs
    0.94-0.98): tests of what a fold does pin the fit it waits for (fold.MIN_FIT) low, whatever the default."""
    import moe_balance.fold
    monkeypatch.setattr(moe_balance.fold, "MIN_FIT", 0.05)


def _random_bias(balancer, scale: float, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    bias = torch.randn(balancer.bias_LE.shape, generator=gen) * scale
    balancer.bias_LE.copy_(bias - bias.mean(-1, keepdim=True))


def _train_steps(model, balancer, data, optimizer=None) -> None:
    for ids in data:
        model(input_ids=ids, labels=ids).loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad()
        balancer.step()


def test_cg_direction_reaches_the_least_squares_fold():
    """One CG iteration per step on that step's sums: on a fixed population it reaches v = (S + lam)^-1 mu,
    and a = v / (mu . v) shifts the mean logit by exactly the bias."""
    from moe_balance.fold import RIDGE, cg_step, input_statistics
    gen = torch.Generator().manual_seed(0)
    D, T = 24, 512
    x = torch.randn(T, D, generator=gen) * 0.5 + torch.linspace(-1, 2, D)  # inputs with a mean
    w = torch.ones(T)
    v, p = torch.zeros(1, D, dtype=torch.float64), torch.zeros(1, D, dtype=torch.float64)
    for _ in range(2 * D):
        sums, scalars = input_statistics(x, w, v[0], p[0])
        a, fit = cg_step(v, p, sums[None], scalars[None])
    xd = x.double()
    S, mu = xd.T @ xd / T, xd.mean(0)
    lam = RIDGE * torch.diagonal(S).mean()
    exact = torch.linalg.solve(S + lam * torch.eye(D, dtype=torch.float64), mu)
    torch.testing.assert_close(v[0], exact, rtol=2e-3, atol=1e-5)  # fp32 sums per call
    assert float(fit[0]) == pytest.approx(float(mu @ exact), rel=1e-4)
    assert float((xd @ a[0]).mean()) == pytest.approx(1.0, abs=1e-5)  # the mean shift is the bias itself


def test_input_statistics_skip_padding_and_non_finite_rows():
    from moe_balance.fold import input_statistics
    x = torch.randn(6, 4)
    x[2] = float("nan")
    w = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    v, p = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    sums, scalars = input_statistics(x, w, v, p)
    kept = x[w > 0]
    sums_kept, scalars_kept = input_statistics(kept, torch.ones(len(kept)), v, p)
    torch.testing.assert_close(sums, sums_kept) and torch.testing.assert_close(scalars, scalars_kept)
    assert bool(torch.isfinite(sums).all())


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_online_fold_moves_the_share_into_the_router_and_off_the_bias(model_type, fold_at_any_fit):
    """After each step fold_share of the bias moves into the router (gpt-oss: into its linear bias, exactly);
    with share 1 the next forward applies no bias: the patched model is the stock one."""
    model = tiny_model(model_type, vocab_size=256, experts=8)
    bal = mb.patch(model, fold_share=1.0)
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if "router" in n or "mlp.gate" in n}
    _train_steps(model, bal, _ids(4, n=3))
    assert bal.metrics()["fold_fit"] > 0.05
    assert bool((bal.bias_LE == 0).all())  # all of it moved (quantile priced a non-zero bias every step)
    moved = [n for n, p in model.named_parameters() if n in routers and not torch.equal(p, routers[n])]
    if model_type == "gpt_oss":
        assert moved and all(n.endswith("router.bias") for n in moved)
    else:
        assert len(moved) == bal.num_layers
    _train_steps(model, bal, _ids(5, n=1))
    assert bal.last_window["differ_L"].sum() == 0 and bal.metrics()["routing_differ"] == 0.0
    mb.unpatch(model)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_bf16_weights_keep_in_the_bias_what_rounding_drops(model_type, fold_at_any_fit):
    """A model trained in bf16 with no fp32 master copy: a small fold edit partly rounds away. The bias gives up
    only the logit shift the weights took (gpt-oss: its bf16 router bias's change; else the edit's mean over the
    step's inputs), so bias + weights still carry the whole price; in fp32 all of it lands."""
    for dtype in (torch.bfloat16, torch.float32):
        model = tiny_model(model_type, vocab_size=256, experts=8).to(dtype)
        bal = mb.patch(model)
        _train_steps(model, bal, _ids(4, n=3))
        assert bool((bal.fold_fit_L >= 0.05).all())  # the direction fits in every layer
        (fold,) = bal.post_step_hooks
        _random_bias(bal, 3e-4)
        before_LE = bal.bias_LE.double().clone()
        routers = {n: p.detach().float().clone() for n, p in model.named_parameters()
                   if "router" in n or "mlp.gate" in n}
        fold(bal)
        taken = {n: p.detach().float() - routers[n] for n, p in model.named_parameters() if n in routers}
        for site in mb.patching.patch_state_of(model).sites:
            change = next(c for n, c in taken.items()  # the tensor the fold edits: gpt-oss's bias, else the weight
                          if f"layers.{site.layer}." in n and n.endswith(("router.bias", "mlp.gate.weight")))
            shift_E = change.double() if change.dim() == 1 else change.double() @ bal.fold_mu_LD[site.layer]
            # nothing is lost: what left the bias is exactly what the weights took
            torch.testing.assert_close(before_LE[site.layer] - bal.bias_LE[site.layer].double(), shift_E,
                                       rtol=0, atol=1e-6)
        kept = float(bal.bias_LE.abs().max() / before_LE.abs().max())
        assert kept > 0.05 if dtype == torch.bfloat16 else kept < 1e-5, (dtype, kept)
        mb.unpatch(model)


def test_no_fold_until_the_inputs_explain_a_constant(monkeypatch):
    """Below fold.MIN_FIT a fold would scramble the routing (token t shifts by b (a . x_t), spread
    sqrt(1/R^2 - 1) around b): the bias stays applied beside the weights, and routing_differ says so."""
    monkeypatch.setattr(mb.fold, "MIN_FIT", 0.9)  # above the fit random ids reach (0.03-0.4)
    model = tiny_model("qwen3_moe", vocab_size=256, experts=8)
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if "mlp.gate" in n}
    bal = mb.patch(model)
    _train_steps(model, bal, _ids(4, n=3))  # random ids: a fit of a few percent
    assert 0 < bal.metrics()["fold_fit"] < mb.fold.MIN_FIT
    assert all(torch.equal(p, routers[n]) for n, p in model.named_parameters() if n in routers)
    assert bal.bias_LE.abs().max() > 0 and bal.metrics()["routing_differ"] > 0
    assert not bool(bal.fold_started_L.any())
    # a layer that has folded once keeps folding while the fit wanders under the threshold (above FIT_FLOOR)
    bal.fold_started_L[0] = True
    _train_steps(model, bal, _ids(5, n=1))
    assert float(bal.fold_fit_L[0]) < mb.fold.MIN_FIT and bal.bias_LE[0].abs().max() == 0
    assert bal.bias_LE[1].abs().max() > 0 and not bool(bal.fold_started_L[1])
    mb.unpatch(model)


def test_fold_share_zero_never_touches_the_weights_and_the_default_keeps_most_of_the_bias(fold_at_any_fit):
    model = tiny_model("qwen3_moe", vocab_size=256, experts=8)
    before = [p.detach().clone() for p in model.parameters()]
    bal = mb.patch(model, fold_share=0.0)
    assert bal.router_dim is None and not bal.post_step_hooks
    _train_steps(model, bal, _ids(4, n=3))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert bal.metrics()["routing_differ"] > 0  # the bias alone routes: stock would differ
    mb.unpatch(model)
    bal = mb.patch(model)  # default: the whole bias every step (from the step the direction fits)
    _train_steps(model, bal, _ids(4, n=6))
    assert bal.config.fold_share_resolved == 1.0 and bal.metrics()["fold_moved_abs_max"] > 0
    assert bal.bias_LE.abs().max() == 0 and bal.metrics()["routing_differ"] < 0.05  # the weights alone route
    mb.unpatch(model)


def test_fold_state_resumes_exactly_and_accumulation_equals_one_batch():
    """The CG state (v, p, a, fit) is in the balancer's state dict; four micro-batches give the same fold
    statistics as one batch of all their rows."""
    torch.manual_seed(0)
    model = tiny_model("qwen3_moe", vocab_size=256, experts=8)
    big = tiny_model("qwen3_moe", vocab_size=256, experts=8)
    big.load_state_dict(model.state_dict())
    bal, bal_big = mb.patch(model, fold_share=1.0), mb.patch(big, fold_share=1.0)
    data = _ids(6, n=8, B=2)
    for step in range(2):
        micro = data[4 * step:4 * step + 4]
        for ids in micro:
            model(input_ids=ids, labels=ids).loss.backward()
        big(input_ids=torch.cat(micro), labels=torch.cat(micro)).loss.backward()
        bal.step(), bal_big.step()
        model.zero_grad(), big.zero_grad()
    for name in ("fold_v_LD", "fold_p_LD", "fold_a_LD", "fold_fit_L"):
        torch.testing.assert_close(getattr(bal, name), getattr(bal_big, name), rtol=1e-4, atol=1e-7)
    resumed = mb.Balancer(num_layers=bal.num_layers, num_experts=8, top_k=2, router_dim=bal.router_dim,
                          fold_share=1.0)
    resumed.load_state_dict(bal.state_dict())
    for name in ("fold_v_LD", "fold_p_LD", "fold_a_LD", "fold_fit_L", "bias_LE"):
        assert torch.equal(getattr(resumed, name), getattr(bal, name))
    mb.unpatch(model), mb.unpatch(big)


def test_a_router_without_one_weight_is_refused_with_the_way_out():
    from moe_balance.patching.folding import fold_targets
    model = tiny_model("qwen3_moe", vocab_size=256, experts=8)
    bal = mb.patch(model)
    site = mb.patching.patch_state_of(model).sites[0]
    weight, bias = fold_targets(site)
    assert tuple(weight.shape) == (8, bal.router_dim) and bias is None
    mb.unpatch(model)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_fold_keeps_the_trained_choice_and_check_export_rebuilds_it(model_type, tmp_path):
    model = tiny_model(model_type, vocab_size=256, experts=8)
    bal = mb.patch(model, fold_share=0.0)  # no online direction: fold_bias estimates one from the batches
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
    bal = mb.patch(model, fold_share=0.0)
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
    experts = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    for name, module in model.named_modules():
        if type(module).__name__.endswith(("TopKRouter", "Router")) and hasattr(module, "weight"):
            module.num_experts = module.weight.shape[0]
            module.register_forward_hook(hook(name))
        elif name.endswith(".gate") and type(module).__name__ == "Linear" and module.out_features == experts:
            # transformers 4.x: a linear gate, its block takes the top-k of its logits
            module.num_experts = experts
            module.register_forward_hook(lambda m, a, out, name=name: hook(name)(
                m, a, out.topk(model.config.num_experts_per_tok, dim=-1).indices))
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


@pytest.mark.compat
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
    callback = MoEBalanceCallback(heatmap_every=0)  # defaults: the online fold, the remainder folded at the end
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=60, per_device_train_batch_size=8,
                             learning_rate=1e-3, logging_steps=20, report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=ByteWindows(train, 64, 512), callbacks=[callback])
    trainer.train()
    # the default folds the whole bias every step: nothing is left for the end, the weights route as trained
    assert callback.export_agreement == 1.0 and callback.export["routing_differ"] == 0.0, callback.export
    logged = next(row for row in trainer.state.log_history if "moe_balance/export_maxvio_served" in row)
    assert logged["moe_balance/export_topk_agreement"] == callback.export_agreement
    assert logged["moe_balance/export_maxvio_served"] < 1.5 * logged["moe_balance/export_maxvio_trained"] + 0.1
    assert bool((callback.balancer.bias_LE == 0).all())
    data = [train[-20_000 + i * 2048:-20_000 + (i + 1) * 2048].reshape(16, 128) for i in range(4)]
    trained = export.routing_report(model, data)
    trainer.save_model(str(tmp_path / "saved"))
    stock = _stock_eval(tmp_path / "saved", data, tmp_path)
    trained_maxvio = sum(trained["maxvio_L"]) / len(trained["maxvio_L"])
    assert abs(stock["loss"] - trained["loss"]) < 1e-4
    assert abs(stock["maxvio"] - trained_maxvio) < 1e-3 + 0.01 * trained_maxvio


def test_lightning_ships_the_trained_routing(tmp_path):
    """Lightning: the online fold runs after every step; at the end the remainder is folded and the export
    metrics reach the loggers, so what is saved is what was trained."""
    from moe_balance.integrations.lightning import MoEBalanceCallback
    from tests.lightning_helpers import CausalLM, loader, skewed_model, trainer

    model = skewed_model()
    callback = MoEBalanceCallback(heatmap_every=0)
    trainer(tmp_path, max_steps=12, callbacks=[callback]).fit(CausalLM(model), loader(n=96))
    assert callback.balancer.metrics()["fold_fit"] > 0.05
    assert bool((callback.balancer.bias_LE == 0).all()) and 0.5 < callback.export_agreement <= 1.0


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_hf_trainer_folds_what_is_applied_at_the_end(model_type, tmp_path):
    """Without the online fold the callback folds the applied bias at on_train_end, logs the agreement,
    and save_model writes the fold record; check-export rebuilds the trained model from the folder."""
    from transformers import Trainer, TrainingArguments

    from moe_balance.integrations.hf import MoEBalanceCallback
    from moe_balance.testing import ByteWindows, skew_routers, stdlib_corpus

    train, _ = stdlib_corpus(max_bytes=300_000)
    model = tiny_model(model_type, vocab_size=256, experts=8)
    skew_routers(model, train[:512].reshape(8, 64), strength=3.0)
    callback = MoEBalanceCallback(fold_share=0.0, heatmap_every=0)  # no online fold: the end fold ships the bias
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=20, per_device_train_batch_size=8,
                             learning_rate=1e-3, logging_steps=10, report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=ByteWindows(train, 64, 256), callbacks=[callback])
    trainer.train()
    bias_before = callback.balancer.fold_report.layers[0].bias_E
    assert bias_before.abs().max() > 0 and bool((callback.balancer.bias_LE == 0).all())
    logged = [row["moe_balance/export_topk_agreement"] for row in trainer.state.log_history
              if "moe_balance/export_topk_agreement" in row]
    assert logged == [callback.export_agreement] and callback.export_agreement <= 1.0
    # after a collapse most tokens route otherwise without the bias (routing_differ); the end fold gives a
    # good part of that routing back (a rank-one weight edit cannot reproduce a large bias token by token:
    # this is what the online fold is for) and the served balance is logged beside the trained one
    assert callback.export_agreement > 1.0 - callback.export["routing_differ"] + 0.2, callback.export
    assert callback.export["maxvio_served"] < 3.0 and callback.export["maxvio_trained"] < 1.0, callback.export
    if model_type == "gpt_oss":  # a router with a linear bias takes the fold exactly (its first layer agrees
        # fully; later layers see inputs changed by the gate weights the fold shifts)
        assert all(f.direction_D is None for f in callback.balancer.fold_report.layers.values())
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / export.FOLD_FILE).exists()
    data = [train[200_000 + i * 2048:200_000 + (i + 1) * 2048].reshape(16, 128) for i in range(4)]
    shipped = export.routing_report(model, data)  # the patched model after the fold applies no bias
    check = export.check_export(tmp_path / "saved", data)
    assert abs(check["loss_stock"] - shipped["loss"]) < 1e-5
    # the trained routing rebuilt from the fold record: as close to the stock load as at the end of training
    assert abs(check["topk_agreement_min"] - callback.export_agreement) < 0.15, (check, callback.export)


def test_plain_loop_ships_with_the_explicit_calls(tmp_path):
    """A plain loop: ship and save_pretrained after; stock transformers in a fresh process routes the saved
    folder exactly as the trained model."""
    from moe_balance.testing import batches, skew_routers, stdlib_corpus

    train, _ = stdlib_corpus(max_bytes=300_000)
    model = tiny_model("qwen3_moe", vocab_size=256, experts=8)
    skew_routers(model, train[:512].reshape(8, 64), strength=3.0)
    balancer = mb.patch(model, attach_loss=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stream = batches(train, 8, 64, seed=0)
    for _ in range(30):
        ids = next(stream)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step(), optimizer.zero_grad(), balancer.step()
    shipped = export.ship(model, [next(stream) for _ in range(4)])
    assert 0.5 < shipped["topk_agreement"] <= 1.0 and bool((balancer.bias_LE == 0).all())
    data = [train[-20_000 + i * 2048:-20_000 + (i + 1) * 2048].reshape(16, 128) for i in range(4)]
    trained = export.routing_report(model, data)
    export.save_pretrained(model, tmp_path / "saved")
    stock = _stock_eval(tmp_path / "saved", data, tmp_path)
    assert abs(stock["loss"] - trained["loss"]) < 1e-4
    assert abs(stock["maxvio"] - sum(trained["maxvio_L"]) / len(trained["maxvio_L"])) < 1e-3
    check = export.check_export(tmp_path / "saved", data)
    # rebuilt from the fold record: the trained model (its remainder put back) against the shipped one
    assert min(check["topk_agreement_L"]) > 0.5 and abs(check["loss_diff"]) < 0.05


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
