"""HF Trainer paths that differ from the plain fp32 one: DeepSpeed resume, rebuilt callbacks,
loss scaling, a shorter last accumulation window."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_balance.integrations.hf import MoEBalanceCallback

from .conftest import run_scenarios, scenario_result
from .hf_helpers import GradCapture, args, datasets, load, saved_checkpoint

transformers = pytest.importorskip("transformers")
RESUME = Path(__file__).parent / "workers" / "hf_resume.py"


PATHS = [("plain", False), ("plain", True), ("zero1", False), ("zero2", True), ("zero3", False)]


@pytest.fixture(scope="module")
def resumed_paths(tmp_path_factory) -> Path:
    """Every path of PATHS trained and resumed in turn by one single-process torchrun."""
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("hf_resume")
    run_scenarios(RESUME, root, {f"{engine}-{restore}": [engine, *(["--restore-callbacks"] if restore else [])]
                                 for engine, restore in PATHS}, nproc=1, timeout=1200, env={"DS_ACCELERATOR": "cpu"})
    return root


@pytest.mark.slow
@pytest.mark.parametrize("engine, restore_callbacks", PATHS)
def test_resume_is_exact_on_every_trainer_path(engine, restore_callbacks, resumed_paths):
    """DeepSpeed resumes through deepspeed_load_checkpoint (the balancer used to restart at step 0 and
    then overwrite the checkpoint's trained e_score_correction_bias); restore_callback_states_from_checkpoint
    rebuilds the callback from its exported args (it used to crash)."""
    (result,) = scenario_result(resumed_paths / f"{engine}-{restore_callbacks}", 1)
    full, resumed = result["full"], result["resumed"]
    assert full["num_steps"] == resumed["num_steps"] == 8
    assert resumed["bias"] == full["bias"] and max(abs(b) for row in full["bias"] for b in row) > 0.01
    assert resumed["native"] == full["native"] and resumed["native"]  # DeepSeek-V3's own buffers
    assert all(resumed["losses"][str(step)] == full["losses"][str(step)] for step in range(5, 9))
    assert resumed["aux_coef"] == pytest.approx(1e-2)
    assert resumed["logged"] == 8  # the rebuilt callback still puts metrics in the logs
    assert resumed["same_callback"] is not restore_callbacks


def _router_grads(tmp_path, name, scaler_scale=None, **overrides):
    folder = tmp_path / "ckpt"
    if not folder.exists():
        saved_checkpoint("mixtral", folder, skew=1.0)
    cap = GradCapture()
    cb = MoEBalanceCallback(aux_loss="switch", aux_loss_coef=1.0, z_loss_coef=0.1, bias_update="none",
                            write_stats=False)
    train_ds, _ = datasets(n_train=overrides.pop("n_train", 64))
    settings = dict(max_steps=2, learning_rate=0.0, per_device_train_batch_size=4, max_grad_norm=0.0)
    settings.update(overrides)
    trainer = transformers.Trainer(model=load(folder), args=args(tmp_path / name, **settings),
                                   train_dataset=train_ds, callbacks=[cb, cap])
    if scaler_scale:  # what fp16=True builds on a GPU; accelerate builds none on CPU
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scaler_scale)
    trainer.train()
    return cap.grads


def test_fp16_loss_scale_reaches_the_attached_loss(tmp_path):
    """Under a GradScaler the attached loss must be scaled like the LM loss (it was 1/S too weak):
    before the optimizer step every gradient, the router's included, is exactly S times the fp32 one."""
    plain = _router_grads(tmp_path, "plain")
    scaled = _router_grads(tmp_path, "scaled", scaler_scale=65536.0)
    assert plain[0].keys() == scaled[0].keys() and plain[0]
    for name in plain[0]:
        torch.testing.assert_close(scaled[0][name] / 65536.0, plain[0][name], rtol=1e-4, atol=1e-7, msg=name)


def test_shorter_last_accumulation_window_is_scaled_like_the_trainer(tmp_path):
    """24 sequences, 4 per micro-batch, GA 4: the epoch's second window has only 2 micro-batches and the
    Trainer divides their losses by 2. With lr 0 its gradients equal one batch of the same 8 sequences."""
    folder = tmp_path / "ckpt"
    saved_checkpoint("mixtral", folder, skew=1.0)
    grads = {}
    for name, bs, ga in (("ga", 4, 4), ("big", 8, 1)):
        cap = GradCapture()
        # z-loss only: a per-token mean, so two micro-batches of 4 average to the batch of 8
        cb = MoEBalanceCallback(z_loss_coef=1.0, bias_update="none", write_stats=False)
        train_ds, _ = datasets(n_train=24)
        trainer = transformers.Trainer(
            model=load(folder), args=args(tmp_path / name, max_steps=-1, num_train_epochs=1, learning_rate=0.0,
                                          per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                                          max_grad_norm=1e9), train_dataset=train_ds, callbacks=[cb, cap])
        trainer.train()
        grads[name] = cap.grads
    assert len(grads["ga"]) == 2 and len(grads["big"]) == 3
    short, reference = grads["ga"][1], grads["big"][2]  # the same 8 sequences, in a window of 2 vs one batch
    for name in reference:
        torch.testing.assert_close(short[name], reference[name], rtol=1e-4, atol=1e-7, msg=name)
