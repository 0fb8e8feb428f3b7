"""Axolotl plugin: the ``moe_balance:`` YAML section validated by axolotl's own config model, and the HF
callback the plugin hands to the Trainer patching and balancing a tiny Qwen3-MoE.

axolotl 0.21 needs Python >= 3.12 (and pulls its own torch): run these in such an environment, e.g.
``python3.12 -m venv v && v/bin/pip install axolotl pytest && v/bin/pip install -e . --no-deps``.
"""

from __future__ import annotations

import sys

import pytest
import torch

axolotl = pytest.importorskip(
    "axolotl", reason=f"axolotl is not importable here (it needs Python >= 3.12; this is {sys.version.split()[0]})")
yaml = pytest.importorskip("yaml")

from axolotl.integrations.base import PluginManager  # noqa: E402
from axolotl.utils.config import validate_config  # noqa: E402
from axolotl.utils.dict import DictDefault  # noqa: E402

from moe_balance.integrations.axolotl import MoEBalancePlugin  # noqa: E402
from moe_balance.integrations.hf import MoEBalanceCallback  # noqa: E402
from moe_balance.patching.api import patch_state_of  # noqa: E402

from .conftest import ROOT  # noqa: E402

EXAMPLE = ROOT / "examples" / "axolotl" / "qwen3_moe_tiny.yml"
PLUGIN = "moe_balance.integrations.axolotl.MoEBalancePlugin"


def _raw():
    return yaml.safe_load(EXAMPLE.read_text())


def _validated(raw):
    manager = PluginManager.get_instance()
    manager.register(PLUGIN)
    return validate_config(DictDefault(raw))


def test_example_yaml_section_passes_axolotl_validation():
    cfg = _validated(_raw())
    assert PLUGIN in cfg.plugins
    assert dict(cfg.moe_balance) == {"bias_update": "sign", "bias_update_rate": 1e-3, "aux_loss": "global_batch",
                                     "aux_loss_coef": 1e-3, "heatmap_every": 10}


@pytest.mark.parametrize("section, message", [({"bias_updte": "sign"}, "did you mean 'bias_update'"),
                                              ({"aux_loss": "nonsense"}, "aux_loss"),
                                              ({"heatmap_every": -1}, "heatmap_every")])
def test_bad_sections_fail_axolotl_validation(section, message):
    with pytest.raises(Exception, match=message) as info:
        _validated(dict(_raw(), moe_balance=section))
    assert type(info.value).__name__ == "ValidationError"


def test_plugin_callback_patches_and_balances_through_the_trainer(tmp_path):
    from transformers import Trainer

    from .hf_helpers import args, datasets, load, saved_checkpoint
    cfg = _validated(_raw())
    model = load(saved_checkpoint("qwen3_moe", tmp_path / "ckpt"))
    assert MoEBalancePlugin().add_callbacks_pre_trainer(DictDefault({}), model) == []  # no section: nothing
    manager = PluginManager.get_instance()
    callbacks = manager.add_callbacks_pre_trainer(cfg=cfg, model=model)
    (cb,) = [c for c in callbacks if isinstance(c, MoEBalanceCallback)]
    assert (cb.config.bias_update, cb.config.aux_loss, cb.heatmap_every) == ("sign", "global_batch", 10)
    train_ds, _ = datasets(n_train=64)
    trainer = Trainer(model=model, args=args(tmp_path / "out", max_steps=6, logging_steps=2,
                                             gradient_accumulation_steps=2, per_device_train_batch_size=4),
                      train_dataset=train_ds, callbacks=callbacks)
    assert patch_state_of(trainer.model) is not None  # patched inside Trainer.__init__ (on_init_end)
    assert patch_state_of(trainer.model).backward_scale() == 0.5
    trainer.train()
    assert cb.balancer.num_steps == 6 and cb.balancer.bias_LE.abs().max() > 0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all("moe_balance/maxvio_global" in h for h in logs)
    assert torch.isfinite(cb.balancer.bias_LE).all()


def _tiny_model_tokenizer_and_data(folder):
    """A tiny Qwen3-MoE with a byte-level BPE tokenizer trained here, and a JSONL of stdlib text (no downloads)."""
    import json

    from moe_balance.testing import byte_bpe_tokenizer, stdlib_files, tiny_model
    texts = [p.read_text(errors="ignore") for p in stdlib_files()[:40]]
    fast = byte_bpe_tokenizer(texts)
    model = tiny_model("qwen3_moe", vocab_size=len(fast), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model.save_pretrained(folder / "tiny")
    fast.save_pretrained(folder / "tiny")
    with open(folder / "data.jsonl", "w") as f:
        for text in texts:
            for i in range(0, min(len(text), 20000), 400):
                f.write(json.dumps({"text": text[i:i + 400]}) + "\n")


@pytest.mark.slow
def test_axolotl_train_runs_the_plugin_end_to_end(tmp_path):
    """``axolotl train`` (its CLI module, as the ``axolotl`` command runs it) on CPU: the YAML's moe_balance
    section reaches the Trainer, metrics are logged, heatmaps land in TensorBoard."""
    import os
    import subprocess
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _tiny_model_tokenizer_and_data(tmp_path)
    raw = _raw()
    for key in ("datasets", "val_set_size", "sample_packing", "optimizer", "bf16", "saves_per_epoch", "num_epochs"):
        raw.pop(key, None)
    raw.update(base_model=str(tmp_path / "tiny"), output_dir=str(tmp_path / "out"),
               dataset_prepared_path=str(tmp_path / "prepared"),
               datasets=[{"path": str(tmp_path / "data.jsonl"), "ds_type": "json", "type": "completion"}],
               sequence_len=64, micro_batch_size=4, gradient_accumulation_steps=2, max_steps=8,
               optimizer="adamw_torch", learning_rate=1e-3, lr_scheduler="constant", logging_steps=1,
               save_strategy="no", bf16=False, fp16=False, tf32=False)
    raw["moe_balance"].update(bias_update_rate=1e-2, heatmap_every=2)
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run([sys.executable, "-m", "axolotl.cli.train", str(tmp_path / "cfg.yml")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (log_dir,) = {p.parent for p in (tmp_path / "out").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.step for e in events.Images("moe_balance/load_heatmap")] == [1, 3, 5, 7]
    maxvio = events.Scalars("train/moe_balance/maxvio_global")
    bias = events.Scalars("train/moe_balance/bias_abs_max")
    assert len(maxvio) == 8 and bias[-1].value > 0
