"""HF Trainer integration with a real Trainer on tiny real models and stdlib text."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from moe_balance.integrations.hf import STATE_FILE, STATS_FILE, MoEBalanceCallback
from moe_balance.patching.api import patch_state_of

from .hf_helpers import GradCapture, args, datasets, load, saved_checkpoint

transformers = pytest.importorskip("transformers")
Trainer = transformers.Trainer


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3"])
def test_trainer_balances_a_skewed_checkpoint(model_type, tmp_path):
    folder = saved_checkpoint(model_type, tmp_path / "ckpt")
    model = load(folder)
    train_ds, val_ds = datasets()
    cb = MoEBalanceCallback(bias_update="sign", bias_update_rate=1e-3)
    trainer = Trainer(model=model, args=args(tmp_path / "out", max_steps=400, logging_steps=50,
                                             per_device_train_batch_size=16),
                      train_dataset=train_ds, eval_dataset=val_ds, callbacks=[cb])
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all("moe_balance/maxvio_global" in h and "moe_balance/bias_abs_max" in h for h in logs)
    assert before["eval_moe_balance/maxvio_global"] > 1.0
    assert after["eval_moe_balance/maxvio_global"] < before["eval_moe_balance/maxvio_global"] / 2, (before, after)
    assert after["eval_loss"] < before["eval_loss"] - 1.0
    assert logs[-1]["moe_balance/bias_abs_max"] > 0
    stats = [json.loads(line) for line in (tmp_path / "out" / STATS_FILE).read_text().splitlines()]
    assert [s["step"] for s in stats] == [h["step"] for h in logs]
    # evaluation measured balance but did not move the bias
    bias = cb.balancer.bias_LE.clone()
    trainer.evaluate()
    assert torch.equal(bias, cb.balancer.bias_LE)


def _grads(tmp_path, aux, ga, bs, name):
    folder = tmp_path / "ckpt"
    if not folder.exists():
        saved_checkpoint("mixtral", folder, skew=1.0)
    cap = GradCapture()
    cb = MoEBalanceCallback(aux_loss=aux, aux_loss_coef=0.5, z_loss_coef=1e-2, bias_update="none")
    train_ds, _ = datasets(n_train=64)
    trainer = Trainer(model=load(folder), args=args(tmp_path / name, max_steps=2, learning_rate=0.0,
                                                    per_device_train_batch_size=bs,
                                                    gradient_accumulation_steps=ga),
                      train_dataset=train_ds, callbacks=[cb, cap])
    trainer.train()
    return cap.grads[1]  # the second step: global_batch uses the first step's global loads


@pytest.mark.parametrize("aux", ["global_batch", "seq"])
def test_gradient_accumulation_matches_one_big_batch(aux, tmp_path):
    """Router gradients with GA=4 x 2 sequences equal 1 x 8 sequences (rtol 1e-4: float sums)."""
    big = _grads(tmp_path, aux, 1, 8, "big")
    acc = _grads(tmp_path, aux, 4, 2, "acc")
    assert big.keys() == acc.keys() and big
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-4, atol=1e-7, msg=name)


def test_micro_batch_switch_loss_is_not_global(tmp_path):
    """Why global_batch exists: the per-micro-batch Switch loss gives other gradients under GA."""
    big = _grads(tmp_path, "switch", 1, 8, "big")
    acc = _grads(tmp_path, "switch", 4, 2, "acc")
    assert any(not torch.allclose(acc[n], big[n], rtol=1e-3, atol=1e-6) for n in big)


def test_balance_loss_reaches_router_with_ga_scale(tmp_path):
    cb = MoEBalanceCallback(aux_loss="switch")
    train_ds, _ = datasets(n_train=16)
    trainer = Trainer(model=load(saved_checkpoint("mixtral", tmp_path / "c", skew=0)),
                      args=args(tmp_path / "o", gradient_accumulation_steps=4), train_dataset=train_ds,
                      callbacks=[cb])
    assert patch_state_of(trainer.model).backward_scale() == 0.25


SIGN_AND_AUX = dict(bias_update="sign", bias_update_rate=5e-3, aux_loss="global_batch", aux_loss_coef=1e-2)


def _run(tmp_path, out, resume=None, max_steps=20, config=None):
    folder = tmp_path / "ckpt"
    if not folder.exists():
        saved_checkpoint("mixtral", folder)
    cb = MoEBalanceCallback(**(config or SIGN_AND_AUX))
    train_ds, _ = datasets(n_train=256)
    trainer = Trainer(model=load(folder), args=args(tmp_path / out, max_steps=max_steps, logging_steps=1,
                                                    save_strategy="steps", save_steps=10),
                      train_dataset=train_ds, callbacks=[cb])
    trainer.train(resume_from_checkpoint=resume)
    first = 11 if resume else 1  # a resumed state carries the checkpoint's log history
    logs = [h for h in trainer.state.log_history if "loss" in h and h["step"] >= first]
    losses = {h["step"]: h["loss"] for h in logs}
    bias = {h["step"]: h["moe_balance/bias_abs_mean"] for h in logs}
    return losses, bias, cb


def test_resume_continues_exactly(tmp_path):
    full_losses, full_bias, full_cb = _run(tmp_path, "full")
    assert (tmp_path / "full" / "checkpoint-10" / STATE_FILE).exists()
    resumed_losses, resumed_bias, resumed_cb = _run(tmp_path, "full", resume=str(tmp_path / "full" / "checkpoint-10"))
    assert sorted(resumed_losses) == list(range(11, 21))
    for step in range(11, 21):
        assert resumed_losses[step] == full_losses[step], (step, resumed_losses[step], full_losses[step])
        assert resumed_bias[step] == full_bias[step]
    assert torch.equal(resumed_cb.balancer.bias_LE, full_cb.balancer.bias_LE)


def test_resume_with_the_online_fold_continues_exactly(tmp_path):
    """Default rule with the online fold (router weights edited after every step, CG state in the balancer);
    the run resumes at step 10 from the checkpoint's weights and balancer state and continues bit-exactly."""
    config = dict(fold_share=0.5)
    full_losses, _, full_cb = _run(tmp_path, "full", config=config)
    resumed_losses, _, resumed_cb = _run(tmp_path, "full", resume=str(tmp_path / "full" / "checkpoint-10"),
                                         config=config)
    assert full_cb.balancer.metrics()["fold_fit"] > 0.05
    for step in range(11, 21):
        assert resumed_losses[step] == full_losses[step], (step, resumed_losses[step], full_losses[step])
    assert torch.equal(resumed_cb.trained_bias_LE, full_cb.trained_bias_LE)
    assert torch.equal(resumed_cb.balancer.fold_a_LD, full_cb.balancer.fold_a_LD)
    assert resumed_cb.export_agreement == full_cb.export_agreement


def test_deepspeed_entry_is_read_and_conflicts_refused(tmp_path):
    from moe_balance.integrations.hf import merge_config
    cfg = merge_config({"z_loss_coef": 1e-3}, {"bias_update": "normalized", "bias_update_rate": 2e-3})
    assert (cfg.bias_update, cfg.bias_update_rate, cfg.z_loss_coef) == ("normalized", 2e-3, 1e-3)
    with pytest.raises(ValueError, match="bias_update: argument 'sign' vs config 'normalized'"):
        merge_config({"bias_update": "sign"}, {"bias_update": "normalized"})
    with pytest.raises(ValueError, match="did you mean 'bias_update'"):
        merge_config({}, {"bias_updat": "sign"})


def test_errors_at_trainer_start(tmp_path):
    with pytest.raises(ValueError, match="bias_update"):
        MoEBalanceCallback(bias_update="sgn")
    from transformers import GPT2Config, GPT2LMHeadModel
    dense = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=256))
    train_ds, _ = datasets(n_train=8)
    with pytest.raises(ValueError, match="GPT2LMHeadModel(.|\n)*register_router"):
        Trainer(model=dense, args=args(tmp_path / "o"), train_dataset=train_ds,
                callbacks=[MoEBalanceCallback()])


def test_custom_compute_loss_subclass_still_gets_the_balance_gradient(tmp_path):
    class MyTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            out = model(input_ids=inputs["input_ids"])
            logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
            loss = torch.nn.functional.cross_entropy(logits, inputs["labels"][:, 1:].reshape(-1))
            return (loss, out) if return_outputs else loss

    def router_grads(aux):
        cap = GradCapture()
        cb = MoEBalanceCallback(aux_loss=aux, aux_loss_coef=1.0, bias_update="none")
        train_ds, _ = datasets(n_train=16)
        MyTrainer(model=load(saved_checkpoint("mixtral", tmp_path / "c", skew=1.0)),
                  args=args(tmp_path / f"o{aux}", max_steps=1, learning_rate=0.0), train_dataset=train_ds,
                  callbacks=[cb, cap]).train()
        return cap.grads[0]
    with_aux, without = router_grads("switch"), router_grads("none")
    assert any(not torch.allclose(with_aux[n], without[n]) for n in with_aux)


def test_skipped_optimizer_step_does_not_move_the_bias(tmp_path):
    cb = MoEBalanceCallback()
    train_ds, _ = datasets(n_train=16)
    trainer = Trainer(model=load(saved_checkpoint("mixtral", tmp_path / "c")), args=args(tmp_path / "o"),
                      train_dataset=train_ds, callbacks=[cb])

    class Skipped:
        step_was_skipped = True
    logits = torch.randn(8, 8)
    cb.balancer.observe(0, logits, torch.zeros(8, 2, dtype=torch.long), selection_scores=logits.softmax(-1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb.on_step_end(trainer.args, trainer.state, trainer.control, optimizer=Skipped())
    assert torch.count_nonzero(cb.balancer.bias_LE) == 0 and cb.balancer.num_steps == 0
    assert cb.balancer.current_window()["tokens_L"].sum() == 0


def test_reporters_see_the_metrics(tmp_path):
    """Metrics are in the logs dict every callback gets, reporters placed before ours included."""
    seen = []

    class Reporter(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))
    train_ds, _ = datasets(n_train=32)
    trainer = Trainer(model=load(saved_checkpoint("mixtral", tmp_path / "c")),
                      args=args(tmp_path / "o", max_steps=4, logging_steps=2, report_to=[]),
                      train_dataset=train_ds, callbacks=[Reporter(), MoEBalanceCallback(log_per_layer=True)])
    trainer.train()
    train_logs = [s for s in seen if "loss" in s]
    assert len(train_logs) == 2
    assert all("moe_balance/maxvio_global" in s and "moe_balance/layer1/maxvio_global" in s for s in train_logs)
