"""Real TRL trainers (SFT, packed SFT, GRPO, DPO; RLOO at construction) with ``MoEBalanceCallback`` on a tiny
Qwen3-MoE and a byte-level BPE tokenizer trained here (no downloads), on CPU.

What is checked at every optimizer step: no pooled aux loss (the trainer's ``aux_loss_enabled``, the model
config's ``output_router_logits``, no ``output_router_logits=True`` in any forward, no ``aux_loss`` in the
logs); what the balancer counts (the policy's training forwards only: generation, old-log-prob and reference
forwards run without grad or on another model); one bias step per optimizer step; the default (quantile) rule
balances under GRPO and DPO against a control run without the callback.
"""

from __future__ import annotations

import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402

import moe_balance as mb  # noqa: E402
from moe_balance.integrations.hf import MoEBalanceCallback  # noqa: E402
from moe_balance.patching.api import patch_state_of  # noqa: E402
from moe_balance.testing import skew_routers, stdlib_files, tiny_model  # noqa: E402

COMMON = dict(report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0,
              data_seed=0, lr_scheduler_type="constant", dataloader_num_workers=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two spinning OpenMP threads
    made a 4-step DPO run take 19 s instead of 0.7 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A skewed tiny Qwen3-MoE (8 experts, top-2) saved with its tokenizer ("a download"), and some text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    folder = tmp_path_factory.mktemp("trl") / "tiny"
    texts = [p.read_text(errors="ignore")[:20000] for p in stdlib_files()[:8]]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    model = tiny_model("qwen3_moe", vocab_size=len(fast), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    heldout = torch.tensor(fast("\n".join(texts[4:]))["input_ids"][:1024]).reshape(16, 64)
    skew_routers(model, heldout[:8], strength=3.0)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    snippets = [t[i:i + 120] for t in texts[:4] for i in range(0, 4800, 300) if len(t[i:i + 120].strip()) > 100]
    return {"folder": folder, "snippets": snippets, "heldout": heldout}


def _load(tiny):
    return AutoModelForCausalLM.from_pretrained(tiny["folder"]), AutoTokenizer.from_pretrained(tiny["folder"])


def heldout_maxvio(model, ids) -> float:
    """MaxVio over a fixed held-out batch (1024 tokens), the bias untouched; an unpatched model is measured
    through a bias-free patch (routing unchanged) that is removed again."""
    state = patch_state_of(model)
    balancer = state.balancer if state is not None else mb.patch(model, bias_update="none", selftest=False)
    try:
        with torch.no_grad(), balancer.measuring():
            model(input_ids=ids)
        return balancer.metrics()["maxvio_global"]
    finally:
        if state is None:
            mb.unpatch(model)


class Probe(TrainerCallback):
    """Listed before MoEBalanceCallback: sees each step's window before the balancer steps it. Records, at every
    step, whether a pooled aux loss could run, and every forward of the policy (grad or not, tokens, kwargs)."""

    def __init__(self):
        self.trainer = None
        self.balancer = None
        self.flags: list[tuple[bool, bool]] = []
        self.window_tokens: list[float] = []
        self.forwards: list[dict] = []  # all policy forwards, tagged with the step they ran in
        self.steps = 0

    def watch(self, trainer, balancer=None):
        self.trainer, self.balancer = trainer, balancer
        trainer.model.register_forward_hook(self._forward, with_kwargs=True)
        return self

    def _forward(self, module, args, kwargs, output):
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        tokens = float(mask.sum()) if mask is not None else float(ids.numel())
        self.forwards.append({"step": self.steps, "grad": torch.is_grad_enabled(), "tokens": tokens,
                              "router_logits": bool(kwargs.get("output_router_logits")),
                              "aux": getattr(output, "aux_loss", None) is not None})

    def _flags(self):
        config = self.trainer.model.config
        self.flags.append((bool(getattr(self.trainer, "aux_loss_enabled", False)),
                           bool(config.output_router_logits or config.get_text_config().output_router_logits)))

    def on_step_begin(self, args, state, control, **kwargs):
        self._flags()

    def on_step_end(self, args, state, control, **kwargs):
        self._flags()
        if self.balancer is not None:
            self.window_tokens.append(float(self.balancer.current_window()["tokens_L"][0]))
        self.steps += 1

    def training_tokens(self) -> list[float]:
        """Per step: tokens of the policy's forwards with grad (the ones the balancer must count)."""
        return [sum(f["tokens"] for f in self.forwards if f["grad"] and f["step"] == s) for s in range(self.steps)]


def assert_no_pooled_aux(trainer, probe):
    assert probe.flags and not any(a or b for a, b in probe.flags), probe.flags  # at every step, before and after
    assert not any(f["router_logits"] or f["aux"] for f in probe.forwards)
    assert not any("aux_loss" in h for h in trainer.state.log_history)
    assert not trainer.aux_loss_enabled and not trainer.model.config.output_router_logits


def assert_balanced_counting(trainer, cb, probe):
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all("moe_balance/maxvio_global" in h and "moe_balance/bias_abs_max" in h for h in logs)
    assert cb.balancer.num_steps == trainer.state.global_step == probe.steps  # one bias step per optimizer step
    assert probe.window_tokens == probe.training_tokens()  # exactly the training forwards' tokens
    assert all(t > 0 for t in probe.window_tokens)


def _moe_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "owns load balancing" in str(w.message)]


# --------------------------------------------------------------------------------------------- SFT
def _sft(tiny, cb_fields=None, callback=True, max_steps=4, **config):
    model, tok = _load(tiny)
    ds = datasets.Dataset.from_list([{"text": s} for s in tiny["snippets"]])
    args = trl.SFTConfig(output_dir=str(tiny["folder"].parent / "sft"), max_steps=max_steps,
                         per_device_train_batch_size=4, learning_rate=1e-3, max_length=48, bf16=False,
                         **{**COMMON, **config})
    cb = MoEBalanceCallback(**(cb_fields or {})) if callback else None
    probe = Probe()
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                             callbacks=[probe] + ([cb] if cb else []))
    probe.watch(trainer, cb.balancer if cb else None)
    return trainer, cb, probe


def price_moved(trainer, cb) -> float:
    """The largest price the controller set: in the bias as training left it, or (the default online fold) in
    what the fold moved into the router weights at a logged step."""
    moved = [h["moe_balance/fold_moved_abs_max"] for h in trainer.state.log_history
             if "moe_balance/fold_moved_abs_max" in h]
    return max([float(cb.trained_bias_LE.abs().max()), *moved])


@pytest.mark.parametrize("fields", [{}, {"aux_loss": "global_batch", "bias_update": "sign"}],
                         ids=["default", "aux_config"])
def test_sft_callback_owns_balancing_at_every_step(tiny, fields):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, cb, probe = _sft(tiny, fields)
        trainer.train()
    # TRL 1.16 turns output_router_logits / aux_loss_enabled on after on_init_end (model coef 1e-3): off again
    assert len(_moe_warnings(record)) == 1, _moe_warnings(record)
    assert "keep_model_aux_loss=True" in _moe_warnings(record)[0]
    assert_no_pooled_aux(trainer, probe)
    assert_balanced_counting(trainer, cb, probe)
    assert price_moved(trainer, cb) > (0.05 if not fields else 0.0)
    if fields:
        assert all(h["moe_balance/aux_loss"] > 0 for h in trainer.state.log_history if "loss" in h)


def test_sft_without_callback_uses_trl_pooled_aux(tiny):
    """The control: what the callback switches off is really on without it (so the checks above can fail)."""
    trainer, _, probe = _sft(tiny, callback=False, max_steps=2)
    trainer.train()
    assert trainer.aux_loss_enabled and any(f["aux"] for f in probe.forwards)
    assert all("aux_loss" in h for h in trainer.state.log_history if "loss" in h)


def test_keep_model_aux_loss_is_honoured(tiny):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, cb, probe = _sft(tiny, {"keep_model_aux_loss": True}, max_steps=2, router_aux_loss_coef=1e-2)
        trainer.train()
    assert not _moe_warnings(record)
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 1e-2
    assert all("aux_loss" in h and "moe_balance/maxvio_global" in h for h in trainer.state.log_history if "loss" in h)
    with pytest.raises(ValueError, match="keep_model_aux_loss"):
        MoEBalanceCallback(keep_model_aux_loss="yes")


def _construct(kind, tiny, coef):
    model, tok = _load(tiny)
    out = str(tiny["folder"].parent / kind)
    cb = [MoEBalanceCallback()]
    if kind == "sft":
        ds = datasets.Dataset.from_list([{"text": s} for s in tiny["snippets"][:4]])
        return trl.SFTTrainer(model=model, args=trl.SFTConfig(out, router_aux_loss_coef=coef, **COMMON),
                              train_dataset=ds, processing_class=tok, callbacks=cb)
    if kind == "dpo":
        ds = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 4)
        return trl.DPOTrainer(model=model, args=trl.DPOConfig(out, router_aux_loss_coef=coef, **COMMON),
                              train_dataset=ds, processing_class=tok, callbacks=cb)
    ds = datasets.Dataset.from_list([{"prompt": "def f(x):"}] * 4)
    cls, config = (trl.GRPOTrainer, trl.GRPOConfig) if kind == "grpo" else (trl.RLOOTrainer, trl.RLOOConfig)
    return cls(model=model, reward_funcs=_reward, train_dataset=ds, processing_class=tok, callbacks=cb,
               args=config(out, router_aux_loss_coef=coef, per_device_train_batch_size=4, num_generations=4,
                           max_completion_length=8, **COMMON))


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo", "rloo"])
def test_explicit_trl_aux_coef_conflicts_at_construction(tiny, kind):
    with pytest.raises(ValueError, match=r"router_aux_loss_coef=0\.01.*MoEBalanceCallback.*keep_model_aux_loss"):
        _construct(kind, tiny, 1e-2)
    with warnings.catch_warnings(record=True) as record:  # 0.0: TRL's own off switch, no conflict, no warning
        warnings.simplefilter("always")
        trainer = _construct(kind, tiny, 0.0)
    assert not trainer.aux_loss_enabled and not _moe_warnings(record)


def test_packed_padding_free_seq_loss_uses_trl_sequence_boundaries(tiny):
    """``packing=True, padding_free=True``: TRL's collator concatenates sequences into one row with
    ``position_ids`` restarting at 0 (and ``cu_seq_lens_q``). The ``seq`` loss of that packed row equals the
    loss of the same sequences as padded rows; read as one long sequence it would not."""
    trainer, cb, probe = _sft(tiny, {"aux_loss": "seq", "bias_update": "none"}, max_steps=2, packing=True,
                              padding_free=True)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" in batch and "attention_mask" not in batch
    trainer.train()
    assert_no_pooled_aux(trainer, probe)
    assert_balanced_counting(trainer, cb, probe)
    assert all(h["moe_balance/aux_loss"] > 0 for h in trainer.state.log_history if "loss" in h)
    model, balancer = trainer.model, cb.balancer
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    pieces = [batch["input_ids"][0, a:b] for a, b in zip(starts[:-1], starts[1:])]
    assert len(pieces) >= 3

    routed = []
    for site in patch_state_of(model).sites:
        site.module.register_forward_hook(lambda m, a, out: routed.append((out[0].detach(), out[2])))

    def seq_loss(**inputs):
        routed.clear()
        with balancer.measuring():  # grad on: the losses are computed (and recorded) in measuring windows too
            model(**inputs)
        return balancer.metrics()["aux_loss"], balancer.load_matrix()

    packed, packed_loads = seq_loss(**{k: v for k, v in batch.items() if k != "labels"})
    # the same routing read as ONE sequence (what a patch blind to TRL's boundaries would compute)
    blind = mb.Balancer(aux_loss="seq", bias_update="none", num_layers=2, num_experts=8, top_k=2)
    one_sequence = sum(float(blind.observe(layer, logits, idx, seq_len=logits.shape[0]))
                       for layer, (logits, idx) in enumerate(routed))
    width = max(len(p) for p in pieces)
    ids = torch.zeros(len(pieces), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, piece in enumerate(pieces):
        ids[row, :len(piece)], mask[row, :len(piece)] = piece, 1
    padded, padded_loads = seq_loss(input_ids=ids, attention_mask=mask)
    assert torch.equal(packed_loads, padded_loads)  # same routing token for token (block-diagonal attention)
    assert packed == pytest.approx(padded, rel=1e-4)
    assert abs(one_sequence - padded) > 0.05 * padded, (one_sequence, padded)


# -------------------------------------------------------------------------------------------- GRPO
def _reward(completions, **kwargs):
    return [float(len(set(c))) for c in completions]


class RoutingShift:
    """Between a rollout's generation (its bias) and each training pass on it: the share of (token, layer)
    top-k sets that changed and the per-token ratio exp(logp_now - logp_at_generation) caused by the bias
    alone (same weights, the two biases), over completion tokens; and TRL's own ratio against its old
    log-probs when it computes them. No-grad forwards: they are not counted by the balancer."""

    def __init__(self, trainer, balancer):
        self.trainer, self.balancer = trainer, balancer
        self.bias_at_generation = None
        self.records: list[dict] = []
        generate, compute = trainer._generate_and_score_completions, trainer._compute_loss

        def generate_and_score(*args, **kwargs):
            self.bias_at_generation = balancer.bias_LE.clone()
            return generate(*args, **kwargs)

        def compute_loss(model, inputs):
            self.records.append(self.measure(model, inputs))
            return compute(model, inputs)

        trainer._generate_and_score_completions = generate_and_score
        trainer._compute_loss = compute_loss

    @torch.no_grad()
    def measure(self, model, inputs) -> dict:
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        keep, comp = inputs["completion_ids"].shape[1], inputs["completion_mask"].bool()
        gates = [s.module for s in patch_state_of(model).sites]
        now = self.balancer.bias_LE.clone()
        runs = {}
        for name, bias in (("generation", self.bias_at_generation), ("now", now)):
            picks = []
            hooks = [g.register_forward_hook(lambda m, a, out, picks=picks: picks.append(out[2].sort(-1).values))
                     for g in gates]
            self.balancer.bias_LE.copy_(bias)
            try:
                logps, _, _ = self.trainer._get_per_token_logps_and_entropies(model, ids, mask, keep)
            finally:
                self.balancer.bias_LE.copy_(now)
                for h in hooks:
                    h.remove()
            runs[name] = (logps, picks)
        valid = mask.reshape(-1).bool()
        changed = [(a != b).any(-1)[valid].float().mean() for a, b in zip(runs["generation"][1], runs["now"][1])]
        ratio = (runs["now"][0] - runs["generation"][0]).exp()[comp]
        out = {"bias_moved": float((now - self.bias_at_generation).abs().max()),
               "topk_changed": float(torch.stack(changed).mean()), "ratio_dev_mean": float((ratio - 1).abs().mean()),
               "ratio_dev_max": float((ratio - 1).abs().max()),
               "clipped": float(((ratio - 1).abs() > self.trainer.epsilon_high).float().mean())}
        if inputs.get("old_per_token_logps") is not None:
            trl_ratio = (runs["now"][0] - inputs["old_per_token_logps"]).exp()[comp]
            out["trl_ratio_dev_mean"] = float((trl_ratio - 1).abs().mean())
        return out


def _grpo(tiny, callback=True, cb_fields=None, max_steps=4, **config):
    model, tok = _load(tiny)
    ds = datasets.Dataset.from_list([{"prompt": s[:40]} for s in tiny["snippets"]])
    args = trl.GRPOConfig(output_dir=str(tiny["folder"].parent / "grpo"), max_steps=max_steps,
                          per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                          learning_rate=1e-4, **{**COMMON, **config})
    cb = MoEBalanceCallback(**(cb_fields or {})) if callback else None
    probe = Probe()
    trainer = trl.GRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=ds, processing_class=tok,
                              callbacks=[probe] + ([cb] if cb else []))
    probe.watch(trainer, cb.balancer if cb else None)
    return trainer, cb, probe


def test_grpo_default_rule_balances_counting_only_training_forwards(tiny):
    """GRPO (TRL defaults: bf16 autocast, gradient checkpointing) with a reference model (beta > 0) and
    num_iterations=2 (old log-probs from a no-grad policy forward, rollouts reused for two steps)."""
    control, _, _ = _grpo(tiny, callback=False, beta=0.04, num_iterations=2)
    control.train()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        # The rule itself, patched (no online fold: the bias alone is measured; shipping is tested in
        # tests/test_export.py)
        trainer, cb, probe = _grpo(tiny, cb_fields={"fold_share": 0.0}, beta=0.04, num_iterations=2)
        assert not trainer.aux_loss_enabled  # GRPO sets it before on_init_end: off at construction already
        ref_forwards = []
        trainer.ref_model.register_forward_hook(lambda *a: ref_forwards.append(torch.is_grad_enabled()))
        shift = RoutingShift(trainer, cb.balancer)
        trainer.train()
    assert len(_moe_warnings(record)) == 1
    assert_no_pooled_aux(trainer, probe)
    assert_balanced_counting(trainer, cb, probe)
    assert any(not f["grad"] for f in probe.forwards)  # generation and old-log-prob forwards ran, uncounted
    assert ref_forwards and patch_state_of(trainer.ref_model) is None
    assert trainer.args.gradient_checkpointing  # its recomputation was not counted twice (window == forwards)
    first = trainer.state.log_history[0]
    assert first["moe_balance/bias_abs_max"] > 0.1  # the quantile price moves as under SFT
    balanced, unbalanced = heldout_maxvio(trainer.model, tiny["heldout"]), heldout_maxvio(control.model,
                                                                                         tiny["heldout"])
    assert balanced < 0.7 * unbalanced, (balanced, unbalanced)
    # rollouts reused for a second step: the bias moved in between and routing changed for some tokens
    reused = shift.records[1::2]
    assert all(r["bias_moved"] > 0 and r["topk_changed"] > 0 for r in reused), shift.records
    assert all(r["bias_moved"] == 0 and r["ratio_dev_max"] == 0 for r in shift.records[0::2])
    print("GRPO num_iterations=2, reused rollouts:", reused)


def test_grpo_num_iterations_1_bias_never_moves_between_generation_and_training(tiny):
    """Aligned GRPO (one generation per optimizer step): the bias steps after the optimizer step and the next
    rollouts are generated with it, so generation and training route alike; TRL's ratio is exactly 1."""
    trainer, cb, probe = _grpo(tiny, max_steps=3, bf16=False, gradient_checkpointing=False)
    shift = RoutingShift(trainer, cb.balancer)
    trainer.train()
    assert_balanced_counting(trainer, cb, probe)
    assert price_moved(trainer, cb) > 0.1
    assert len(shift.records) == 3 and all(r["bias_moved"] == 0 and r["topk_changed"] == 0 for r in shift.records)
    assert all("trl_ratio_dev_mean" not in r for r in shift.records)  # no old log-probs: ratio == 1 by design


# --------------------------------------------------------------------------------------------- DPO
def _dpo(tiny, callback=True, max_steps=4, **cb_fields):
    model, tok = _load(tiny)
    s = tiny["snippets"]
    ds = datasets.Dataset.from_list([{"prompt": a[:40], "chosen": a[40:80], "rejected": b[40:80]}
                                     for a, b in zip(s, s[1:] + s[:1])])
    args = trl.DPOConfig(output_dir=str(tiny["folder"].parent / "dpo"), max_steps=max_steps,
                         per_device_train_batch_size=4, learning_rate=1e-4, max_length=64, bf16=False, **COMMON)
    cb = MoEBalanceCallback(**cb_fields) if callback else None
    probe = Probe()
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                             callbacks=[probe] + ([cb] if cb else []))
    probe.watch(trainer, cb.balancer if cb else None)
    return trainer, cb, probe


def test_dpo_default_rule_balances_without_reference_forwards(tiny):
    control, _, _ = _dpo(tiny, callback=False)
    control.train()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, cb, probe = _dpo(tiny, fold_share=0.0)  # the rule alone, patched (shipping: tests/test_export.py)
        ref_forwards = []
        trainer.ref_model.register_forward_hook(lambda *a: ref_forwards.append(1))
        trainer.train()
    assert len(_moe_warnings(record)) == 1
    assert_no_pooled_aux(trainer, probe)
    assert_balanced_counting(trainer, cb, probe)
    assert ref_forwards and patch_state_of(trainer.ref_model) is None
    assert trainer.state.log_history[0]["moe_balance/bias_abs_max"] > 0.1
    balanced, unbalanced = heldout_maxvio(trainer.model, tiny["heldout"]), heldout_maxvio(control.model,
                                                                                         tiny["heldout"])
    assert balanced < 0.7 * unbalanced, (balanced, unbalanced)
