"""Regressions from real training runs: gradients that never arrive, loss scales, devices, packing,
checkpoint safety. Each test failed before its fix (see the real-runs issue)."""

from __future__ import annotations

import copy
import pickle
import warnings
from pathlib import Path

import pytest
import torch

import moe_balance as mb
from moe_balance.patching.versions import verifiable_here
from moe_balance.losses import segments_from_seq_len, sequence_loss, RoutingBatch, scores_to_probs
from moe_balance.patching.api import patch_state_of
from moe_balance.patching.interception import SelectionInterceptor
from moe_balance.scaling import BackwardScale, precision_scale_of
from moe_balance.testing import tiny_model

ARCHS = verifiable_here()  # the registry's model types the installed transformers defines


def lm_batch(seed=0, B=2, S=12, vocab=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, S), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def router_param_names(model):
    names = set()
    for site in patch_state_of(model).sites:
        prefix = site.name + "."
        names |= {prefix + n for n, _ in site.module.named_parameters()}
    return names


# ---------------------------------------------------------------- 1. the attached loss reaches the router
@pytest.mark.parametrize("model_type", ARCHS)
def test_attached_loss_adds_exactly_the_balance_loss_gradient(model_type):
    """For every registered architecture: LM loss with the attached balance loss == LM loss + balancer.loss()
    computed separately, and the router gradient really changes (Llama 4 used to drop it)."""
    cfg = mb.BalanceConfig(aux_loss="switch", aux_loss_coef=10.0, z_loss_coef=1.0, bias_update="none")
    base = tiny_model(model_type)
    base.train()
    attached, explicit, plain = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # models whose own aux loss is switched off say so
        mb.patch(attached, cfg, attach_loss=True)
        bal_explicit = mb.patch(explicit, cfg)
        mb.patch(plain, bias_update="none")
    batch = lm_batch()
    attached(**batch).loss.backward()
    (explicit(**batch).loss + bal_explicit.loss()).backward()
    plain(**batch).loss.backward()
    g_att, g_exp, g_plain = grads_of(attached), grads_of(explicit), grads_of(plain)
    assert g_att.keys() == g_exp.keys()
    for name in g_att:
        torch.testing.assert_close(g_att[name], g_exp[name], rtol=1e-4, atol=1e-6, msg=name)
    routers = router_param_names(attached) & g_att.keys()
    assert routers, "no router parameter received a gradient"
    assert any(not torch.allclose(g_att[n], g_plain[n], rtol=1e-3, atol=1e-6) for n in routers), \
        "the attached balance loss did not change the router gradient"


# ---------------------------------------------------------------- 2. fp16 loss scaling
def test_attached_loss_follows_a_grad_scaler():
    """Under GradScaler(S) every gradient, the attached balance loss's included, is S times the fp32 one."""
    cfg = mb.BalanceConfig(aux_loss="switch", aux_loss_coef=1.0, bias_update="none")
    ref, scaled = tiny_model("mixtral"), tiny_model("mixtral")
    mb.patch(ref, cfg, attach_loss=True)
    mb.patch(scaled, cfg, attach_loss=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
    patch_state_of(scaled).backward_scale = BackwardScale(precision=precision_scale_of(scaler))
    batch = lm_batch()
    ref(**batch).loss.backward()
    scaler.scale(scaled(**batch).loss).backward()
    g_ref, g_scaled = grads_of(ref), grads_of(scaled)
    for name in router_param_names(ref):
        torch.testing.assert_close(g_scaled[name] / 65536.0, g_ref[name], rtol=1e-4, atol=1e-8, msg=name)


def test_precision_scale_of_each_engine():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert float(precision_scale_of(scaler)()) == 1024.0
    assert precision_scale_of(torch.amp.GradScaler("cpu", enabled=False)) is None

    class FP16Optimizer:  # DeepSpeed's FP16_Optimizer / ZeRO optimizers expose loss_scale, not always cur_scale
        loss_scale = 4096.0
    assert precision_scale_of(FP16Optimizer())() == 4096.0
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True)
    assert precision_scale_of(acc) is None  # fp32: nothing to follow
    acc.scaler = scaler
    assert float(precision_scale_of(acc)()) == 1024.0


def test_accelerate_attach_scales_the_attached_loss_like_accelerator_backward():
    accelerate = pytest.importorskip("accelerate")
    from moe_balance.integrations.accelerate import attach

    def run(scale):
        acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
        if scale:  # accelerate builds no GradScaler on CPU; give it one as it does for fp16 on GPU
            acc.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        model = tiny_model("mixtral")
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        model, opt = acc.prepare(model, opt)
        attach(acc, model, opt, aux_loss="switch", aux_loss_coef=1.0, bias_update="none")
        with acc.accumulate(model):
            acc.backward(model(**lm_batch()).loss)
        return grads_of(acc.unwrap_model(model)), router_param_names(acc.unwrap_model(model))

    plain, routers = run(None)
    scaled, _ = run(65536.0)
    for name in routers:
        torch.testing.assert_close(scaled[name] / 65536.0, plain[name], rtol=1e-4, atol=1e-8, msg=name)


# ---------------------------------------------------------------- 4. seq loss needs real sequences
def _captured_routing(model):
    """Router (logits, chosen experts) per layer from forward hooks on the patched routers."""
    captured = []

    def hook(module, args, output):
        captured.append((output[0].detach(), output[2].detach()))
    handles = [s.module.register_forward_hook(hook) for s in patch_state_of(model).sites]
    return captured, handles


@pytest.mark.parametrize("packed", [False, True])
def test_seq_loss_uses_sequences_without_an_attention_mask(packed):
    """A plain loop (input_ids only) and a padding-free packed row (position_ids resets) get the
    per-sequence loss; it used to silently equal the batch-wide Switch loss."""
    model = tiny_model("mixtral")
    bal = mb.patch(model, aux_loss="seq", aux_loss_coef=1.0, bias_update="none")
    ids = lm_batch(B=2, S=8)["input_ids"]
    kwargs = {"input_ids": ids}
    if packed:  # what DataCollatorWithFlattening emits: one row, positions restart per sequence
        kwargs = {"input_ids": ids.reshape(1, 16), "position_ids": torch.arange(8).repeat(2)[None]}
    captured, handles = _captured_routing(model)
    model(**kwargs)
    for h in handles:
        h.remove()
    bal.loss()
    bal.step()
    expected = 0.0
    segment_T, n = segments_from_seq_len(16, 8)
    switch = 0.0
    for logits, idx in captured:
        probs = scores_to_probs(logits, "softmax")
        counts = torch.zeros(8).index_add_(0, idx.reshape(-1), torch.ones(idx.numel()))
        expected += sequence_loss(RoutingBatch(logits, probs, torch.ones(16), counts, idx, 2, segment_T, n)).item()
        switch += mb.aux_loss("switch", RoutingBatch(logits, probs, torch.ones(16), counts, idx, 2)).item()
    assert bal.metrics()["aux_loss"] == pytest.approx(expected, rel=1e-5)
    assert abs(expected - switch) > 1e-4


def test_batch_info_segments_from_cu_seq_lens_and_positions():
    from moe_balance.patching.strategies import BatchInfo
    cu = BatchInfo(shape_BS=(1, 10), cu_seqlens=torch.tensor([0, 3, 10]))
    assert cu.segments_for(10, torch.device("cpu")).tolist() == [0] * 3 + [1] * 7
    pos = BatchInfo(shape_BS=(2, 5), position_ids_BS=torch.tensor([[0, 1, 0, 1, 2], [3, 4, 5, 0, 1]]))
    assert pos.segments_for(10, torch.device("cpu")).tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    rows = BatchInfo(shape_BS=(2, 5))
    assert rows.segments_for(10, torch.device("cpu")).tolist() == [0] * 5 + [1] * 5
    assert rows.segments_for(12, torch.device("cpu")) is None  # routers saw other tokens: no guess


# ---------------------------------------------------------------- 5. the balancer follows the model's device
@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3"])
def test_balancer_follows_a_model_moved_after_patching(model_type):
    """Engines move the model after the patch (Trainer under DeepSpeed/FSDP, deepspeed.initialize):
    the bias must be read, counts kept and losses computed on the routers' device. meta stands in for
    the GPU; the routers run alone because the experts' own code syncs with the host (.item())."""
    model = tiny_model(model_type)
    bal = mb.patch(model, aux_loss="switch", z_loss_coef=1e-3)
    model.to("meta")
    hidden = torch.randn(12, model.config.hidden_size, device="meta", requires_grad=True)
    for site in patch_state_of(model).sites:
        output = site.module(hidden)
        assert all(t.device.type == "meta" for t in output if isinstance(t, torch.Tensor))
    assert bal.bias_LE.device.type == "meta" and bal.counts_LE.device.type == "meta"
    assert bal.loss().device.type == "meta"


def test_native_bias_sync_follows_the_buffer_device():
    model = tiny_model("deepseek_v3")
    bal = mb.patch(model)
    model.to("meta")
    bal.to("meta")
    for callback in bal.step_callbacks:  # writes into the buffers that now live on meta
        callback(bal)
    assert all(s.native_bias.device.type == "meta" for s in patch_state_of(model).sites)


# ---------------------------------------------------------------- 9. native buffers of the whole family
BLOCK_BIAS_ARCHS = {"minimax_m2": {}, "hy_v3": {}, "afmoe": {}, "ernie4_5_moe": {},
                    "lfm2_moe": {"use_expert_bias": True}}


@pytest.mark.parametrize("model_type", sorted(BLOCK_BIAS_ARCHS))
def test_model_bias_buffer_gets_the_trained_bias(model_type, tmp_path):
    """Models whose MoE block passes its own bias buffer to the router: the trained bias goes into
    that buffer (not stacked on top), so stock transformers serve save_pretrained's output as trained."""
    if model_type not in ARCHS:
        pytest.skip(f"{model_type} is not in this transformers' registry")
    model = tiny_model(model_type, **BLOCK_BIAS_ARCHS[model_type])
    bal = mb.patch(model, bias_update="sign", bias_update_rate=5e-2)  # AFMoE's zero-initialised router ties all
    sites = patch_state_of(model).sites                                 # scores: no price splits a tie, a rate does
    assert all(s.native_owner is not None for s in sites), [s.name for s in sites]
    for step in range(3):
        model(**lm_batch(step))
        bal.step()
    assert bal.bias_LE.abs().max() > 0
    for s in sites:
        assert torch.equal(s.native_bias.float().reshape(-1), bal.bias_LE[s.layer])
    batch = lm_batch(7)
    with torch.no_grad():
        patched_logits = model(**batch).logits
    model.save_pretrained(tmp_path)
    stock = type(model).from_pretrained(tmp_path)
    with torch.no_grad():
        stock_logits = stock(**batch).logits
    torch.testing.assert_close(stock_logits, patched_logits, rtol=1e-5, atol=1e-5)
    mb.unpatch(model)
    assert all(torch.count_nonzero(s.native_bias) == 0 for s in sites)  # unpatch restores the original


# ---------------------------------------------------------------- 10 and 11: checkpoints
def test_resume_keeps_the_configured_aux_weight():
    saved = mb.Balancer(mb.BalanceConfig(aux_loss="switch", aux_loss_coef=1e-2), num_layers=1, num_experts=4,
                        top_k=1).state_dict()
    fixed = mb.Balancer(mb.BalanceConfig(aux_loss="switch", aux_loss_coef=1e-4), num_layers=1, num_experts=4,
                        top_k=1)
    fixed.load_state_dict(saved)
    assert fixed.aux_coef.item() == pytest.approx(1e-4) and fixed.metrics()["aux_coef"] == pytest.approx(1e-4)
    adaptive_cfg = dict(aux_loss="switch", adaptive_aux=True, adaptive_target_maxvio=0.0, bias_update="sign")
    trained = mb.Balancer(adaptive_cfg, aux_loss_coef=1e-3, num_layers=1, num_experts=4, top_k=1)
    trained.observe(0, torch.randn(8, 4), torch.zeros(8, 1, dtype=torch.long))
    trained.loss()
    trained.step()
    resumed = mb.Balancer(adaptive_cfg, aux_loss_coef=1e-3, num_layers=1, num_experts=4, top_k=1)
    resumed.load_state_dict(trained.state_dict())
    assert resumed.aux_coef.item() == pytest.approx(trained.aux_coef.item()) != pytest.approx(1e-3)


class _Planted:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.mkdir, (Path(self.target),))


def test_loading_a_tampered_state_runs_no_code(tmp_path):
    bal = mb.Balancer(num_layers=1, num_experts=4, top_k=1)
    state = bal.state_dict()
    state["_extra_state"]["payload"] = _Planted(tmp_path / "pwned")
    path = tmp_path / "moe_balance.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        bal.load(path)
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        mb.patch(model, state=path)
    assert not (tmp_path / "pwned").exists()
    assert mb.patching.patch_state_of(model) is None
    clean = tmp_path / "clean.pt"
    bal.save(clean)
    bal.load(clean)  # the real format loads with weights_only=True
    assert pickle.HIGHEST_PROTOCOL  # (pickle imported for the planted object's protocol)


# ---------------------------------------------------------------- 12. smaller ones
def test_bias_is_ranked_in_fp32_for_bf16_routers():
    """0.0015 next to 0.5 rounds away in bf16: the biased expert must still win."""
    x = torch.tensor([[0.5, 0.5, 0.1, 0.1]], dtype=torch.bfloat16)
    mode = SelectionInterceptor(torch.tensor([0.0, 0.0015, 0.0, 0.0]), num_experts=4, top_k=1)
    with mode:
        values, idx = torch.topk(x, 1, dim=-1)
    assert idx.tolist() == [[1]]
    assert values.dtype == torch.bfloat16 and values.tolist() == [[0.5]]


@pytest.mark.parametrize("attach", [True, False])
def test_reentrant_checkpointing_counts_once_and_keeps_the_loss(attach):
    cfg = mb.BalanceConfig(aux_loss="switch", aux_loss_coef=1.0, bias_update="none")
    ref, ckpt = tiny_model("mixtral"), tiny_model("mixtral")
    ref.train(), ckpt.train()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    bal_ref = mb.patch(ref, cfg, attach_loss=True)
    bal = mb.patch(ckpt, cfg, attach_loss=attach)
    batch = lm_batch()
    ref(**batch).loss.backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = ckpt(**batch).loss
        extra = bal.loss()
        (loss + extra).backward()
    assert extra.item() == 0.0  # computed during backward, so not here ...
    if not attach:
        assert any("reentrant" in str(w.message) for w in caught)
    window, ref_window = bal.current_window(), bal_ref.current_window()
    assert window["tokens_L"].tolist() == [24.0, 24.0]
    assert window["loss_batches_L"].tolist() == [1.0, 1.0]
    torch.testing.assert_close(window["aux_sum_L"], ref_window["aux_sum_L"])  # ... but reported
    g_ref, g = grads_of(ref), grads_of(ckpt)
    for name in router_param_names(ref):  # ... and its gradient applied
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-7, msg=name)


def test_forwards_outside_training_do_not_count():
    model = tiny_model("mixtral")
    model.train()
    bal = mb.patch(model, bias_update_rate=1e-2)
    model(**lm_batch())
    counted = bal.current_window()["counts_LE"].clone()
    with torch.no_grad():
        model(**lm_batch(1))  # e.g. an eval loop that is not wrapped
    model.generate(lm_batch(2)["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)  # e.g. in a callback
    assert torch.equal(bal.current_window()["counts_LE"], counted)
    with bal.measuring(), torch.no_grad():
        model(**lm_batch(1))
    assert bal.last_window["tokens_L"].tolist() == [24.0, 24.0]
    assert torch.equal(bal.current_window()["counts_LE"], counted)


def test_patch_reaches_routers_behind_accelerate_hooks():
    """device_map dispatch and CPU/disk offload wrap each module's forward in an accelerate hook that calls
    the forward bound before the patch: the routers were bypassed (the first forward now says so)."""
    accelerate = pytest.importorskip("accelerate")
    model = tiny_model("mixtral")
    ids = lm_batch()["input_ids"]
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    accelerate.cpu_offload(model, execution_device="cpu")  # weights on meta until each hook loads them
    bal = mb.patch(model, bias_update="none")
    out = model(input_ids=ids)
    assert torch.equal(out.logits.detach(), reference)
    assert bal.current_window()["tokens_L"].tolist() == [24.0, 24.0]
    gate = model.model.layers[0].mlp.gate
    mb.unpatch(model)
    assert gate._old_forward.__func__ is type(gate).forward and "_mb_saved_old_forward" not in gate.__dict__


def test_sigmoid_router_losses_use_probabilities_that_sum_to_one():
    """DeepSeek-V3 scores with sigmoid; the aux loss must see them normalised over experts (they summed
    to E/2 per token when the config's score_func was left at its softmax default)."""
    model = tiny_model("deepseek_v3")
    bal = mb.patch(model, aux_loss="switch", aux_loss_coef=1.0, bias_update="none")
    seen = []
    original = bal.observe

    def spy(layer, logits, idx, mask=None, **kwargs):
        seen.append(kwargs["scores"])
        return original(layer, logits, idx, mask, **kwargs)
    bal.observe = spy
    model(**lm_batch())
    assert seen and all(torch.allclose(s.sum(-1), torch.ones(s.shape[0])) for s in seen)
    switch = bal.metrics()  # switch loss of a near-uniform tiny router is about 1, not about E/2
    bal.loss()
    bal.step()
    assert bal.metrics()["aux_loss"] / bal.num_layers < 2.0, switch
