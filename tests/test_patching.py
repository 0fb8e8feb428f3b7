"""Router adapters over the registry: exactness, reversibility, idempotence, save/load."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import moe_balance as mb
from moe_balance.patching.versions import verifiable_here
from moe_balance.patching import registry
from moe_balance.patching.registry import MODEL_TYPES, detect
from moe_balance.testing import tiny_model

ARCHS = verifiable_here()  # the registry's model types the installed transformers defines
# (model_type, tiny-config overrides): every verified architecture, plus variants whose routing
# differs from the tiny default (LongCat-Flash with zero-computation experts, as in its real config)
CASES = [pytest.param(t, {}, id=t) for t in ARCHS] + [
    pytest.param("longcat_flash", {"zero_expert_num": 4}, id="longcat_flash-zero_experts")]


def lm_batch(seed=0, B=2, S=12, vocab=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, S), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def run(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def assert_same_run(a, b):
    assert torch.equal(a[0], b[0]), "logits differ"
    assert torch.equal(a[1], b[1]), "loss differs"
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        assert torch.equal(a[2][name], b[2][name]), f"gradient of {name} differs"


@pytest.mark.compat
@pytest.mark.parametrize(("model_type", "overrides"), CASES)
def test_zero_bias_patch_is_bit_identical_and_reversible(model_type, overrides, tmp_path):
    model = tiny_model(model_type, **overrides)
    model.train()
    batch = lm_batch()
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    classes_before = {n: type(m) for n, m in model.named_modules()}
    reference = run(model, batch)
    with torch.no_grad():
        gen_ref = model.generate(batch["input_ids"][:1, :4], max_new_tokens=4, do_sample=False)

    bal = mb.patch(model, mb.BalanceConfig(bias_update="sign"))
    strategy = MODEL_TYPES[model_type]
    routers = mb.find_routers(model)
    assert {r["strategy"] for r in routers if r["strategy"]} == {strategy}, routers
    assert bal.num_layers == sum(r["strategy"] is not None for r in routers) >= 1
    assert mb.patch(model, mb.BalanceConfig(bias_update="sign")) is bal  # twice: no stacking
    assert_same_run(run(model, batch), reference)
    with torch.no_grad():
        assert torch.equal(model.generate(batch["input_ids"][:1, :4], max_new_tokens=4, do_sample=False), gen_ref)
    bal.reset_window()
    run(model, batch)
    assert bal.current_window()["tokens_L"].min() == 24  # every layer counted every real token once

    # deepcopy keeps the patch and its own state; save_pretrained ships only stock keys
    twin = copy.deepcopy(model)
    assert_same_run(run(twin, batch), run(model, batch))
    model.save_pretrained(tmp_path)
    stock = type(model).from_pretrained(tmp_path, output_loading_info=True)[1]
    assert not stock["unexpected_keys"] and not stock["missing_keys"], stock

    mb.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes_before
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())
    assert not model._forward_pre_hooks
    assert_same_run(run(model, batch), reference)
    mb.unpatch(twin)
    mb.unpatch(model)  # harmless when not patched

    # the default config (quantile) ranks log-probabilities / logits: with a zero bias, the same run again
    assert mb.patch(model).config.ranks_logits
    assert_same_run(run(model, batch), reference)
    with torch.no_grad():
        assert torch.equal(model.generate(batch["input_ids"][:1, :4], max_new_tokens=4, do_sample=False), gen_ref)
    mb.unpatch(model)


@pytest.mark.compat
@pytest.mark.parametrize("model_type", ARCHS)
def test_registry_matches_detection(model_type):
    model = tiny_model(model_type)
    routers = [r for r in mb.find_routers(model) if r["strategy"] is not None]
    assert routers and {r["strategy"] for r in routers} == {MODEL_TYPES[model_type]}
    modules = dict(model.named_modules())  # detection agrees (a block patched for its router: the router's)
    assert all(detect(modules[r["name"]])[0] in (r["strategy"], None) for r in routers
               if registry.is_router_candidate(modules[r["name"]]))


def test_bias_changes_selection_not_weights():
    model = tiny_model("mixtral")
    bal = mb.patch(model)
    gate = model.model.layers[0].mlp.gate
    hidden = torch.randn(16, 32)
    with torch.no_grad():
        logits, w0, idx0 = gate(hidden)
        bal.bias_LE[0, 3] = 10.0  # force expert 3 into every selection
        _, w1, idx1 = gate(hidden)
    assert (idx1 == 3).any(-1).all() and not (idx0 == 3).all()
    probs = torch.softmax(logits.float(), -1)
    expected = probs.gather(-1, idx1)
    torch.testing.assert_close(w1, expected / expected.sum(-1, keepdim=True))  # unbiased scores, renormalised


def test_native_bias_master_is_fp32_and_written_in_buffer_dtype(tmp_path):
    model = tiny_model("deepseek_v3")
    for m in model.modules():
        if hasattr(m, "e_score_correction_bias"):
            m.e_score_correction_bias.data = torch.full_like(m.e_score_correction_bias, 0.25).bfloat16()
    bal = mb.patch(model, bias_update_rate=1e-3)
    assert bal.bias_LE.dtype == torch.float32 and torch.all(bal.bias_LE == 0.25)  # starts from the checkpoint
    model(**lm_batch())
    bal.step()
    routers = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    for layer, router in enumerate(routers):
        assert router.e_score_correction_bias.dtype == torch.bfloat16
        assert torch.equal(router.e_score_correction_bias, bal.bias_LE[layer].bfloat16())
    assert not torch.all(bal.bias_LE == 0.25)
    # the trained bias ships in the checkpoint when kept, and stock transformers serves it
    mb.unpatch(model, keep_native_bias=True)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    loaded_bias = [m.e_score_correction_bias for m in loaded.modules() if hasattr(m, "e_score_correction_bias")]
    for layer, buf in enumerate(loaded_bias):
        assert torch.equal(buf.float(), bal.bias_LE[layer].bfloat16().float())


def test_padding_counts_match_unpadded():
    model = tiny_model("qwen3_moe")
    bal = mb.patch(model)
    ids = lm_batch(S=8)["input_ids"][:1]
    counts = {}
    for side in ("none", "left", "right"):
        pad = torch.zeros(1, 5, dtype=torch.long)
        if side == "none":
            inp, mask = ids, torch.ones_like(ids)
        elif side == "left":
            inp, mask = torch.cat([pad, ids], 1), torch.cat([pad, torch.ones_like(ids)], 1)
        else:
            inp, mask = torch.cat([ids, pad], 1), torch.cat([torch.ones_like(ids), pad], 1)
        with bal.measuring(), torch.no_grad():  # a no-grad forward counts only while measuring
            model(input_ids=inp, attention_mask=mask)
        counts[side] = bal.last_window["counts_LE"]
        assert bal.last_window["tokens_L"].tolist() == [8.0, 8.0]
    # right padding leaves the real tokens' hidden states unchanged: identical counts
    assert torch.equal(counts["none"], counts["right"])
    # left padding shifts positions (RoPE offsets), so only the totals must match
    assert torch.equal(counts["left"].sum(-1), counts["none"].sum(-1))


def test_gradient_checkpointing_counts_once():
    model = tiny_model("mixtral")
    model.gradient_checkpointing_enable()
    model.train()
    bal = mb.patch(model, aux_loss="switch", attach_loss=True)
    out = model(**lm_batch())
    out.loss.backward()
    window = bal.current_window()
    assert window["tokens_L"].tolist() == [24.0, 24.0]
    assert window["loss_batches_L"].tolist() == [1.0, 1.0]
    gate_grad = model.model.layers[0].mlp.gate.weight.grad
    assert gate_grad is not None and gate_grad.abs().sum() > 0


def test_attached_loss_equals_explicit_loss():
    """attach_loss=True puts exactly balancer.loss() into the gradients, scaled by backward_scale."""
    explicit, attached = tiny_model("qwen3_moe"), tiny_model("qwen3_moe")
    cfg = mb.BalanceConfig(aux_loss="switch", aux_loss_coef=0.1, z_loss_coef=1e-2)
    b1 = mb.patch(explicit, cfg)
    mb.patch(attached, cfg, attach_loss=True)
    mb.patching.patch_state_of(attached).backward_scale = lambda: 0.5
    batch = lm_batch()
    (explicit(**batch).loss + 0.5 * b1.loss()).backward()
    attached(**batch).loss.backward()
    for (n, p1), (_, p2) in zip(explicit.named_parameters(), attached.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_builtin_aux_loss_is_turned_off_with_a_warning():
    model = tiny_model("mixtral", output_router_logits=True, router_aux_loss_coef=0.02)
    with pytest.warns(UserWarning, match="output_router_logits=False"):
        mb.patch(model, aux_loss="switch")
    assert model.config.output_router_logits is False
    mb.unpatch(model)
    assert model.config.output_router_logits is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mb.patch(model)  # loss-free only: the model's own loss is left as configured
    assert model.config.output_router_logits is True


def test_unsupported_model_error_names_class_and_fix():
    class Dense(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
    with pytest.raises(mb.UnsupportedModelError, match=r"Dense(.|\n)*register_router"):
        mb.patch(Dense())


def test_register_router_for_a_custom_model():
    class MyRouter(torch.nn.Linear):
        def forward(self, x):
            logits = super().forward(x)
            w, i = torch.topk(logits.softmax(-1), 2)
            return logits, w, i

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.r = MyRouter(8, 4)
        def forward(self, x):
            _, w, i = self.r(x.reshape(-1, 8))
            return (w * i).sum()

    mb.register_router(MyRouter, "generic", num_experts="out_features", top_k=lambda m: 2)
    net = Net()
    bal = mb.patch(net, selftest=False)
    net(torch.randn(5, 8))
    assert bal.current_window()["tokens_L"].item() == 5


def test_state_beside_checkpoint_restores_routing(tmp_path):
    model = tiny_model("mixtral")
    bal = mb.patch(model, fold_share=0.0)  # the bias beside the weights (the online fold would move it into them)
    for step in range(10):
        model(**lm_batch(step))  # training forwards (grad on) are the ones that count
        bal.step()
    bal.save(tmp_path / "moe_balance.pt")
    model.save_pretrained(tmp_path)

    def routed(m, b):
        with b.measuring(), torch.no_grad():
            logits = m(**lm_batch(99, B=8, S=32)).logits
        return logits, b.last_window["counts_LE"]
    expected_logits, expected_counts = routed(model, bal)
    # (a reload of fused expert weights alone moves logits by ~1e-7, so compare routing exactly
    # and logits to that tolerance)
    again = type(model).from_pretrained(tmp_path)
    bal2 = mb.patch(again, state=tmp_path / "moe_balance.pt")
    assert torch.equal(bal2.bias_LE, bal.bias_LE) and bal2.num_steps == 10
    logits, counts = routed(again, bal2)
    assert torch.equal(counts, expected_counts)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-6)
    fresh = type(model).from_pretrained(tmp_path)
    assert not torch.equal(routed(fresh, mb.patch(fresh))[1], expected_counts)  # the bias mattered


def test_selftest_catches_a_bypassed_router():
    model = tiny_model("mixtral")
    block = model.model.layers[1].mlp
    original = type(block).forward

    def bypass(self, hidden_states):  # a "kernel" that routes without calling the router module
        gate = self.gate
        saved = type(gate).forward
        try:
            type(gate).forward = gate._mb_original_class.forward if hasattr(gate, "_mb_site") else saved
            return original(self, hidden_states)
        finally:
            type(gate).forward = saved
    type(block).forward = bypass
    try:
        forward_hooks = dict(model._forward_hooks)
        mb.patch(model)  # no test forward at patch time: the first real forward checks
        with pytest.raises(RuntimeError, match=r"model.layers.1.mlp.gate"):
            model(**lm_batch())
    finally:
        type(block).forward = original
    assert "_moe_balance" not in model.__dict__  # a failed check leaves nothing behind
    assert dict(model._forward_hooks) == forward_hooks
    with pytest.raises(RuntimeError, match=r"model.layers.1.mlp.gate"):  # the explicit check still exists
        type(block).forward = bypass
        try:
            mb.patch(model)
            mb.patching.run_selftest(model)
        finally:
            type(block).forward = original
            mb.unpatch(model)


def test_patching_runs_no_forward_and_checks_once():
    model = tiny_model("mixtral")
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    mb.patch(model)
    assert not calls  # no side effects: sharded/partitioned weights are never touched at patch time
    model(**lm_batch())
    model(**lm_batch(1))
    state = mb.patching.patch_state_of(model)
    assert state.check_hook_id is None and state.forward_hits is None and len(calls) == 2


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_compile_has_no_graph_breaks(model_type):
    model = tiny_model(model_type)
    mb.patch(model, aux_loss="switch", z_loss_coef=1e-3, attach_loss=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=lm_batch()["input_ids"])
    assert explained.graph_break_count == 0, explained.break_reasons


def test_compiled_fullgraph_forward_counts_tokens():
    model = tiny_model("mixtral").eval()
    bal = mb.patch(model)
    batch = lm_batch()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"]).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        with bal.measuring():
            got = compiled(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert bal.last_window["tokens_L"].tolist() == [24.0, 24.0]


@pytest.mark.compat
def test_every_installed_moe_architecture_is_classified():
    """A new transformers MoE architecture fails here until it is verified, unsupported or listed."""
    from moe_balance.patching.registry import UNSUPPORTED, UNVERIFIED, discover_moe_model_types
    discovered = discover_moe_model_types()
    assert {"mixtral", "qwen3_moe", "gpt_oss"} <= set(discovered)  # routers found on every release (4.x blocks too)
    unclassified = [t for t in discovered if t not in MODEL_TYPES and t not in UNSUPPORTED and t not in UNVERIFIED]
    assert not unclassified, f"classify these model types in moe_balance/patching/registry.py: {unclassified}"


def test_explicit_selftest_on_a_healthy_model_passes_and_keeps_the_patch():
    model = tiny_model("mixtral")
    mb.patch(model)
    mb.patching.run_selftest(model)  # it used to starve the first-forward check and unpatch
    model(**lm_batch())
    assert mb.patching.patch_state_of(model) is not None
