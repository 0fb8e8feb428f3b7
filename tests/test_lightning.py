"""Lightning integration with a real lightning.pytorch Trainer (CPU) on a tiny skewed Mixtral and stdlib text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

from moe_balance.integrations.lightning import MoEBalanceCallback, find_moe_model  # noqa: E402
from moe_balance.patching.api import patch_state_of  # noqa: E402
from moe_balance.testing import eval_maxvio, stdlib_corpus  # noqa: E402

from .conftest import ROOT, run_single_process, run_torchrun  # noqa: E402
from .lightning_helpers import CausalLM, loader, skewed_model, trainer  # noqa: E402

import lightning.pytorch as pl  # noqa: E402

WORKER = Path(__file__).parent / "workers" / "lightning_run.py"


def _fit(root, cb, steps, bs=8, n=None, lr=1e-3, model=None, **overrides):
    model = model if model is not None else skewed_model()
    module = CausalLM(model, lr=lr)
    tr = trainer(root, max_steps=steps, callbacks=[cb, *overrides.pop("extra_callbacks", [])], **overrides)
    ga = overrides.get("accumulate_grad_batches", 1)
    tr.fit(module, loader(n=n or steps * bs * ga, bs=bs))
    return tr, module


@pytest.mark.slow
def test_balances_a_skewed_model_against_a_control(tmp_path):
    """Same seed, data and steps; only the bias rule differs (the default, with its online fold, against none)."""
    val, _ = stdlib_corpus(max_bytes=300_000, split="val")
    ends = {}
    for rule in ("quantile", "none"):
        torch.manual_seed(0)
        cb = MoEBalanceCallback(bias_update=rule)
        tr, module = _fit(tmp_path / rule, cb, steps=60)
        assert cb.balancer.num_steps == 60 == tr.global_step
        assert "moe_balance/maxvio_global" in tr.callback_metrics
        ends[rule] = eval_maxvio(module.model, cb.balancer, val, n_batches=4)
    print("held-out MaxVio", ends)
    assert ends["none"] > 2.0, ends
    assert ends["quantile"] < ends["none"] / 4, ends


class _GradCapture(pl.Callback):
    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()
                           if "gate" in n and p.grad is not None})


def _router_grads(tmp_path, ga, bs, name):
    cap = _GradCapture()
    cb = MoEBalanceCallback(aux_loss="global_batch", aux_loss_coef=0.5, z_loss_coef=1e-2, bias_update="none")
    _fit(tmp_path / name, cb, steps=2, bs=bs, lr=0.0, accumulate_grad_batches=ga, extra_callbacks=[cap],
         model=skewed_model(skew=1.0))
    assert len(cap.grads) == 2 and cb.balancer.num_steps == 2
    assert patch_state_of(cb.model).backward_scale() == 1 / ga
    return cap.grads[1]  # the second step: global_batch uses the first step's global loads


def test_accumulation_of_4_equals_one_big_batch(tmp_path):
    """Router gradients (LM + balance loss) with accumulate_grad_batches=4 x 2 sequences equal 1 x 8 sequences.
    A balance loss not divided by 4 would make them differ (coef 0.5 dominates the router gradient)."""
    big = _router_grads(tmp_path, 1, 8, "big")
    acc = _router_grads(tmp_path, 4, 2, "acc")
    assert big.keys() == acc.keys() and big
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-4, atol=1e-7, msg=name)


def test_bias_steps_only_after_real_optimizer_steps(tmp_path):
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.global_step, cb.balancer.num_steps))

    cb = MoEBalanceCallback(bias_update="sign", bias_update_rate=1e-2)
    tr, _ = _fit(tmp_path, cb, steps=3, bs=2, accumulate_grad_batches=4, extra_callbacks=[Watch()])
    assert [s for _, s in seen] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert all(g == s for g, s in seen)
    assert cb.balancer.last_window["tokens_L"].tolist() == [4 * 2 * 64.0] * 2  # 4 micro-batches of 2 x 64
    assert cb.balancer.bias_LE.abs().max() > 0


def test_skipped_16_mixed_steps_leave_the_bias_alone(tmp_path):
    """16-mixed with a GradScaler on CPU; an initial scale of 2**20 overflows the first steps (4 of 12 here),
    which the scaler skips while Lightning still counts them in global_step: the bias moves only on the others."""
    from lightning.pytorch.plugins.precision import MixedPrecision
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    scales = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            scales.append((float(scaler.get_scale()), cb.balancer.num_steps, patch_state_of(cb.model).backward_scale()))

    cb = MoEBalanceCallback(bias_update="sign", bias_update_rate=1e-2, aux_loss="global_batch", aux_loss_coef=1e-3)
    tr, _ = _fit(tmp_path, cb, steps=12, bs=2, plugins=[plugin], extra_callbacks=[Watch()])
    skipped = sum(1 for (before, _, _), (after, _, _) in zip([(2.0 ** 20, 0, 0)] + scales, scales) if after < before)
    assert 1 <= skipped < 12, scales
    assert tr.global_step == 12
    assert cb.balancer.num_steps == 12 - skipped, (skipped, scales)
    assert cb.balancer.bias_LE.abs().max() > 0
    # the attached loss follows the scaler's current scale (accumulation 1)
    assert float(scales[-1][2]) == scales[-1][0]


def _resume_run(tmp_path, out, ckpt_path=None, epochs=2):
    torch.manual_seed(0)
    cb = MoEBalanceCallback(bias_update="sign", bias_update_rate=5e-3, aux_loss="global_batch", aux_loss_coef=1e-2)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / out), save_top_k=-1, every_n_epochs=1,
                                        save_on_train_epoch_end=True)
    module = CausalLM(skewed_model())
    tr = trainer(tmp_path / out, max_epochs=epochs, callbacks=[cb, ckpt], enable_checkpointing=True)
    tr.fit(module, loader(n=48, bs=4), ckpt_path=ckpt_path)
    return cb, module, tr


def test_resume_from_ckpt_path_is_exact(tmp_path):
    full_cb, full_module, _ = _resume_run(tmp_path, "full")
    first = tmp_path / "full" / "epoch=0-step=12.ckpt"
    assert first.exists(), sorted(p.name for p in (tmp_path / "full").iterdir())
    saved = torch.load(first, weights_only=True)["callbacks"]["MoEBalanceCallback"]["balancer"]
    assert saved["_extra_state"]["num_steps"] == 12 and saved["bias_LE"].abs().max() > 0
    res_cb, res_module, res_tr = _resume_run(tmp_path, "resumed", ckpt_path=str(first))
    assert res_tr.global_step == 24 and res_cb.balancer.num_steps == 24
    assert torch.equal(res_cb.balancer.bias_LE, full_cb.balancer.bias_LE)
    for (name, a), (_, b) in zip(full_module.model.state_dict().items(), res_module.model.state_dict().items()):
        assert torch.equal(a, b), name
    # and the resume really restored something: a fresh run of epoch 2 alone ends elsewhere
    fresh_cb, _, _ = _resume_run(tmp_path, "fresh", epochs=1)
    assert not torch.equal(fresh_cb.balancer.bias_LE, full_cb.balancer.bias_LE)


def test_validation_measures_without_moving_the_bias(tmp_path):
    cb = MoEBalanceCallback(bias_update="sign", bias_update_rate=1e-2)
    module = CausalLM(skewed_model())
    tr = trainer(tmp_path, max_steps=4, callbacks=[cb])
    tr.fit(module, loader(n=32, bs=4), loader(n=16, bs=8, split="val"))
    bias = cb.balancer.bias_LE.clone()
    out = tr.validate(module, loader(n=16, bs=8, split="val"))[0]
    assert out["val_moe_balance/maxvio_global"] > 0
    assert torch.equal(bias, cb.balancer.bias_LE) and cb.balancer.num_steps == 4
    assert cb.balancer.last_window["tokens_L"].tolist() == [16 * 64.0] * 2  # the 16 validation windows only


def test_model_search_and_errors():
    module = CausalLM(skewed_model(skew=0))
    assert find_moe_model(module) is module.model
    assert find_moe_model(module, "model.model") is module.model.model
    with pytest.raises(TypeError, match="not an nn.Module"):
        find_moe_model(module, "lr")

    class Two(CausalLM):
        def __init__(self):
            super().__init__(skewed_model(skew=0))
            self.other = skewed_model(skew=0)
    with pytest.raises(ValueError, match="model_attr"):
        find_moe_model(Two())
    with pytest.raises(ValueError):
        MoEBalanceCallback(bias_update="nonsense")


def test_heatmaps_reach_the_tensorboard_logger(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    cb = MoEBalanceCallback(bias_update="sign", bias_update_rate=1e-2, heatmap_every=2)
    _fit(tmp_path, cb, steps=8, bs=2, logger=tb, log_every_n_steps=2)
    events = EventAccumulator(tb.log_dir, size_guidance={"images": 0}).Reload()
    assert {"moe_balance/load_heatmap", "moe_balance/maxvio_curve"} <= set(events.Tags()["images"])
    heat = events.Images("moe_balance/load_heatmap")
    assert [e.step for e in heat] == [2, 6]  # logging events at steps 2, 4, 6, 8; every 2nd one, the first included
    assert heat[0].width > 100 and heat[0].height > 50
    assert "moe_balance/maxvio_global" in set(events.Tags()["scalars"])


@pytest.mark.slow
def test_two_ddp_ranks_keep_identical_biases_equal_to_one_process(tmp_path):
    """strategy='ddp' on 2 CPU ranks (gloo, torchrun): counts are summed over ranks at every step, so both
    ranks hold the same bias, and it matches one process seeing the same global batches (lr 0: routing fixed).
    Not bit-equal to the single process: float32 router logits of a batch of 2 and of 4 differ in the last
    bits, and a near tie in top-k then lands on another expert (one entry of 16 moved by one update here;
    fused experts refuse float64)."""
    run_torchrun(WORKER, str(tmp_path), "2", "6", "0.0", nproc=2, timeout=600)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["strategy"] for r in ranks] == ["DDPStrategy"] * 2
    assert torch.equal(ranks[0]["bias"], ranks[1]["bias"]) and ranks[0]["bias"].abs().max() > 0
    assert ranks[0]["steps"] == 6 and ranks[0]["calls"] == 6
    single = tmp_path / "single"
    single.mkdir()
    from .workers.lightning_run import main
    run_single_process(main, str(single), 4, 6, 0.0)
    one = torch.load(single / "rank0.pt")
    assert one["world"] == 1
    differ = (one["bias"] - ranks[0]["bias"]).abs()
    assert differ.max() <= 2 * 1e-2 + 1e-6 and int((differ > 0).sum()) <= 2, differ
    assert one["bias"].abs().max() > 0


@pytest.mark.slow
def test_example_runs_and_writes_heatmaps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # 2 threads: 5x slower on a busy machine
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "lightning_train.py"), "--steps", "20",
                           "--logdir", str(tmp_path / "logs")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "steps 20  processes 1" in proc.stdout and "val MaxVio" in proc.stdout
    (log_dir,) = {p.parent for p in (tmp_path / "logs").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0}).Reload()
    assert {"moe_balance/load_heatmap", "moe_balance/maxvio_curve"} <= set(events.Tags()["images"])
