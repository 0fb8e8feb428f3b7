"""The moe_balance section of framework configs (axolotl, LlamaFactory, ms-swift): checked before training."""

from __future__ import annotations

import pytest

from moe_balance.integrations.options import CALLBACK_KEYS, callback_kwargs


def test_fields_and_callback_options_are_split_and_kept():
    kwargs = callback_kwargs({"bias_update": "sign", "bias_update_rate": 1e-3, "heatmap_every": 5,
                              "keep_model_aux_loss": True, "ship": False, "ship_batches": 4, "write_stats": False})
    assert kwargs == {"bias_update": "sign", "bias_update_rate": 1e-3, "heatmap_every": 5, "keep_model_aux_loss": True,
                      "ship": False, "ship_batches": 4, "write_stats": False}
    assert callback_kwargs(None) == {} and callback_kwargs({"aux_loss": None}) == {}


@pytest.mark.parametrize("section, message", [
    ({"ship_batches": 0}, "moe_balance.ship_batches must be an integer >= 1, got 0"),
    ({"heatmap_every": -1}, "moe_balance.heatmap_every must be an integer >= 0"),
    ({"keep_model_aux_loss": "yes"}, "moe_balance.keep_model_aux_loss must be true or false, got 'yes'"),
    ({"ship": 1}, "moe_balance.ship must be true or false"),
    ({"bias_updte": "sign"}, "did you mean 'bias_update'"),
    ({"aux_loss": "nonsense"}, "aux_loss"),
])
def test_bad_values_name_the_field_and_what_is_allowed(section, message):
    with pytest.raises(ValueError, match=message):
        callback_kwargs(section)


def test_every_callback_option_is_a_callback_argument():
    import inspect
    pytest.importorskip("transformers")
    from moe_balance.integrations.hf import MoEBalanceCallback
    assert set(CALLBACK_KEYS) <= set(inspect.signature(MoEBalanceCallback).parameters)
