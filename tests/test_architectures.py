"""Per-architecture facts the balancer relies on: score functions, selection widths, recomputation."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import moe_balance as mb
from moe_balance.patching.versions import verifiable_here
from moe_balance.losses import scores_to_probs
from moe_balance.patching import registry
from moe_balance.testing import tiny_model

ARCHS = verifiable_here()  # the registry's model types the installed transformers defines


def token_batch(seed: int = 0, B: int = 2, S: int = 12, vocab: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab, (B, S), generator=torch.Generator().manual_seed(seed))


class TopkValues(TorchFunctionMode):
    """Records the values of every top-``k`` over ``E`` experts, in call order (the unpatched model's choices)."""

    def __init__(self, experts: int, k: int) -> None:
        super().__init__()
        self.experts, self.k, self.values = experts, k, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.topk, torch.Tensor.topk):
            k = args[1] if len(args) > 1 else (kwargs or {}).get("k")
            if k == self.k and args[0].dim() == 2 and args[0].shape[-1] == self.experts:  # not a group top-k
                self.values.append(out.values.detach())
        return out


def observed_routing(model: torch.nn.Module) -> tuple[list[dict], list[tuple], dict[int, object]]:
    """Patch ``model``, run one batch; return its routers as found, what each layer handed to the
    balancer (logits, indices) and each patched router's own output. A patched MoE block (transformers 4.x: the
    block chooses for its linear gate) returns hidden states: its weights are the top-k values of an unpatched run."""
    (router, *_) = [r for r in mb.find_routers(model) if r["strategy"] is not None]
    unpatched = TopkValues(router["num_experts"], router["top_k"])
    with torch.no_grad(), unpatched:
        model(input_ids=token_batch())
    bal = mb.patch(model)
    handed: list[tuple] = []
    observe = bal.observe

    def capture(layer, logits, idx, *args, **kwargs):
        handed.append((layer, logits.detach(), idx.detach()))
        return observe(layer, logits, idx, *args, **kwargs)
    bal.observe = capture  # an instance attribute: the class and transformers stay untouched
    outputs: dict[int, object] = {}
    sites = mb.patching.patch_state_of(model).sites
    hooks = [s.module.register_forward_hook(lambda m, a, out, layer=s.layer: outputs.setdefault(layer, out))
             for s in sites]
    try:
        model(input_ids=token_batch())  # with grad: a training forward, which the balancer records
    finally:
        for hook in hooks:
            hook.remove()
    routers = [r for r in mb.find_routers(model) if r["strategy"] is not None]
    for site in sites:
        if not registry.is_router_candidate(site.module):  # a block
            outputs[site.layer] = unpatched.values[site.layer]
    mb.unpatch(model)
    return routers, handed, outputs


def router_weights(output: object, logits_TE: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
    """The weights the router itself gives its chosen experts, ``[T, K]``."""
    T, K = idx_TK.shape
    if isinstance(output, tuple) and len(output) == 5 and output[2].numel() == T * K:
        # transformers 4.57 GraniteMoE gating: (order, batch_index, gates, expert_size, logits), gates sorted by
        # expert; ``order`` gives each one's place among the flattened [T, K] choices
        weights = torch.zeros(T * K, dtype=torch.float32)
        weights[output[0]] = output[2].float()
        return weights.reshape(T, K)
    floats = [t.reshape(T, -1) for t in (output if isinstance(output, tuple) else (output,))
              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() % T == 0]
    for tensor in floats:
        if tensor.shape[-1] == K:
            return tensor.float()
    for tensor in floats:  # llama4: E-wide sigmoid scores, the unchosen experts at 0
        if tensor.shape[-1] == logits_TE.shape[-1] and not torch.equal(tensor, logits_TE.reshape(T, -1)):
            return tensor.float().gather(-1, idx_TK)
    raise AssertionError(f"no [T, K] weights in the router output {[tuple(t.shape) for t in floats]}")


def balancer_probs(logits_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    """What the aux losses use: scores_to_probs with the router's sigmoid scores, as strategies.report passes."""
    scores = torch.sigmoid(logits_TE.float()) if score_func == "sigmoid" else None
    return scores_to_probs(logits_TE, score_func, scores)


def assert_probs_match_router(model: torch.nn.Module) -> None:
    routers, handed, outputs = observed_routing(model)
    assert len(handed) == len(routers) >= 1
    for layer, logits_TE, idx_TK in handed:
        score_func = routers[layer]["score_func"]
        logits_TE = logits_TE.reshape(idx_TK.shape[0], -1)
        probs_TE = balancer_probs(logits_TE, score_func)
        torch.testing.assert_close(probs_TE.sum(-1), torch.ones(len(probs_TE)))
        # the router weights its chosen experts by its own scores (up to per-token normalisation and
        # a constant scale): the balancer's probabilities must rank and weigh them the same way
        ours = probs_TE.gather(-1, idx_TK)
        theirs = router_weights(outputs[layer], logits_TE, idx_TK)
        torch.testing.assert_close(ours / ours.sum(-1, keepdim=True), theirs / theirs.sum(-1, keepdim=True),
                                   rtol=1e-4, atol=1e-6, msg=f"layer {layer} scored as {score_func}")


@pytest.mark.compat
@pytest.mark.parametrize(("model_type", "overrides"), [pytest.param(t, {}, id=t) for t in ARCHS] + [
    pytest.param("longcat_flash", {"zero_expert_num": 4}, id="longcat_flash-zero_experts")])
def test_balancer_probabilities_are_the_routers_own_scores(model_type, overrides):
    assert_probs_match_router(tiny_model(model_type, **overrides))


def test_cohere2_moe_score_function_follows_its_config():
    sigmoid = tiny_model("cohere2_moe", expert_selection_fn="sigmoid", norm_topk_prob=True)
    assert {r["score_func"] for r in mb.find_routers(sigmoid)} == {"sigmoid"}
    assert_probs_match_router(sigmoid)
    assert {r["score_func"] for r in mb.find_routers(tiny_model("cohere2_moe"))} == {"softmax"}


def test_longcat_zero_experts_are_balanced_slots():
    """8 routed + 4 zero-computation experts: the balancer sees, counts and biases all 12 slots."""
    model = tiny_model("longcat_flash", zero_expert_num=4)
    router = model.model.layers[0].mlp.router
    assert mb.find_routers(model)[0]["num_experts"] == 12 == router.e_score_correction_bias.numel()
    zero_slot = 8 + 2
    with torch.no_grad():  # LongCat adds its bias to softmax scores: 10 forces every token into the slot
        router.e_score_correction_bias[zero_slot] = 10.0
    bal = mb.patch(model, bias_update_rate=1e-3)
    assert bal.bias_LE.shape == (1, 12) and bal.bias_LE[0, zero_slot] == 10.0  # the master covers zero slots
    bal.reset_window()
    model(input_ids=token_batch())  # a training forward (grad on) is counted
    counts_E = bal.current_window()["counts_LE"][0]
    assert counts_E.shape == (12,) and counts_E[zero_slot] == 24 and counts_E.sum() == 48
    bal.step()  # the sign rule pushes the overloaded zero slot down; the native buffer follows
    assert bal.bias_LE[0, zero_slot] < 10.0
    assert torch.equal(router.e_score_correction_bias, bal.bias_LE[0].to(router.e_score_correction_bias.dtype))
    mb.unpatch(model)
    assert router.e_score_correction_bias[zero_slot] == 10.0


def checkpointed_run(use_checkpointing: bool, use_reentrant: bool) -> tuple[torch.Tensor, dict, dict]:
    """One training step of a patched tiny Qwen3.5-MoE text model: loss, gradients, the step window."""
    model = tiny_model("qwen3_5_moe_text")
    model.train()
    if use_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    bal = mb.patch(model, aux_loss="switch", aux_loss_coef=0.1, attach_loss=True)
    with torch.no_grad():  # a bias that changes routing: the recomputation must route as the forward did
        bal.bias_LE.copy_(0.05 * torch.randn(bal.bias_LE.shape, generator=torch.Generator().manual_seed(1)))
    ids = token_batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, bal.current_window()


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_qwen3_5_moe_gradient_checkpointing_changes_nothing(use_reentrant):
    """transformers#47467: Qwen3.5-MoE's routing may change on recompute. Patched, a checkpointed step
    must give the loss and gradients of a plain one (balance loss included) and count each token once."""
    loss, grads, window = checkpointed_run(False, use_reentrant)
    ckpt_loss, ckpt_grads, ckpt_window = checkpointed_run(True, use_reentrant)
    assert torch.equal(ckpt_loss, loss)
    assert ckpt_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-6, atol=1e-9, msg=name)
    router_grads = [n for n in grads if n.endswith("mlp.gate.weight")]
    assert len(router_grads) == 2 and all(grads[n].abs().sum() > 0 for n in router_grads)
    assert ckpt_window["tokens_L"].tolist() == [24.0, 24.0]  # counted once, not again at recompute
    assert torch.equal(ckpt_window["counts_LE"], window["counts_LE"])


def test_dense_hybrid_with_a_gated_norm_is_not_taken_for_moe():
    """Bamba has no experts (num_experts is fixed at 1); its only *Gate* class is an RMSNorm."""
    from moe_balance.patching.registry import discover_moe_model_types
    discovered = discover_moe_model_types()
    assert "bamba" not in discovered and "jamba" in discovered


def test_dots3_note_multimodal_is_refused_with_its_reason():
    model = tiny_model("dots3_note")  # vision MoE layers beside the verified dots3_note_text language model
    routers = {r["class"] for r in mb.find_routers(model) if r["strategy"]}
    assert routers == {"Dots3NoteTextTopkRouter", "Dots3NoteVisionTopKRouter"}
    with pytest.raises(mb.UnsupportedModelError, match="vision tower"):
        mb.patch(model)


