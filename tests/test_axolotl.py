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
