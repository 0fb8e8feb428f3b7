"""Config validation: every bad value names its field; unknown keys get a suggestion."""

from __future__ import annotations

import dataclasses
import json

import pytest

import moe_balance as mb

BAD_VALUES = {
    "aux_loss": ["swtich", 3],
    "aux_loss_coef": [-1.0, float("nan"), "0.1"],
    "z_loss_coef": [-1e-3, float("inf")],
    "fold_share": [-0.1, 1.5, "0.3", float("nan")],
    "score_func": ["relu"],
    "adaptive_aux": ["yes"],
    "adaptive_target_maxvio": [-0.1],
    "adaptive_rate": [0.0, -1.0],
    "adaptive_min_coef": [-1.0],
    "adaptive_max_coef": [-1.0],
    "bias_update": ["sgn", None],
    "bias_space": ["logit", 1],
    "bias_update_rate": [-1e-3, float("nan")],
    "bias_schedule": ["exp"],
    "bias_schedule_steps": [-1, 1.5],
    "bias_warmup_steps": [-1, 2.0],
    "bias_ema": [1.0, -0.1],
    "bias_clamp": [0.0, -1.0],
    "bias_freeze": [1],
    "quantile_step": ["kalman", 1],
    "quantile_bins": [2, 10_000, 8.0],
    "expert_parallel_size": [0, 1.5],
    "capacity_factors": [(), (0.0,), (-1.0,)],
    "nan_policy": ["ignore"],
    "log_per_layer": ["no"],
}


def test_every_field_has_a_bad_value_case():
    assert set(BAD_VALUES) == {f.name for f in dataclasses.fields(mb.BalanceConfig)}


@pytest.mark.parametrize("field, value", [(f, v) for f, vs in BAD_VALUES.items() for v in vs])
def test_bad_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        mb.BalanceConfig(**{field: value})


def test_choice_error_lists_allowed_values():
    with pytest.raises(ValueError, match="'switch'.*'global_batch'"):
        mb.BalanceConfig(aux_loss="nope")


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean 'bias_update_rate'"):
        mb.BalanceConfig.from_dict({"bias_update_rat": 1e-3})


def test_cross_field_rules():
    with pytest.raises(ValueError, match="bias_schedule_steps"):
        mb.BalanceConfig(bias_schedule="step")
    with pytest.raises(ValueError, match="adaptive_min_coef"):
        mb.BalanceConfig(aux_loss="switch", adaptive_min_coef=1.0, adaptive_max_coef=0.1)
    with pytest.raises(ValueError, match="adaptive_aux"):
        mb.BalanceConfig(adaptive_aux=True)


def test_json_round_trip():
    cfg = mb.BalanceConfig(aux_loss="seq", aux_loss_coef=1e-4, bias_schedule="step", bias_schedule_steps=100,
                           capacity_factors=(1.0, 2.0))
    again = mb.BalanceConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg


def test_defaults_are_the_documented_ones():
    cfg = mb.BalanceConfig()
    assert (cfg.bias_update, cfg.bias_update_rate, cfg.aux_loss, cfg.z_loss_coef) == ("quantile", 1e-3, "none", 0.0)
    assert cfg.quantile_bins == 128 and cfg.expert_parallel_size == 1


def test_resolve_config_merges_keywords_and_checks_keys():
    cfg = mb.resolve_config(mb.BalanceConfig(aux_loss="switch"), z_loss_coef=1e-3)
    assert (cfg.aux_loss, cfg.z_loss_coef) == ("switch", 1e-3)
    with pytest.raises(ValueError, match="did you mean 'z_loss_coef'"):
        mb.resolve_config(None, zloss_coef=1e-3)


def test_retired_keys_say_what_replaced_them_and_saved_configs_drop_them():
    for key in ("bias_absorb_coef", "handover_fraction"):
        with pytest.raises(ValueError, match=f"{key}.*removed.*fold_share"):
            mb.BalanceConfig.from_dict({key: 0.3})
    saved = {**mb.BalanceConfig().to_dict(), "handover_fraction": 0.3, "bias_absorb_coef": None}
    assert mb.BalanceConfig.from_dict(mb.config.without_retired(saved)) == mb.BalanceConfig()


def test_fold_share_needs_a_bias_in_logit_space():
    assert mb.BalanceConfig().fold_share_resolved == mb.config.DEFAULT_FOLD_SHARE == 1.0
    assert mb.BalanceConfig(bias_update="sign").fold_share_resolved == 0.0  # a bias on probabilities
    assert mb.BalanceConfig(bias_update="sign", bias_space="logits").fold_share_resolved == 1.0
    with pytest.raises(ValueError, match="fold_share=0.5 needs a bias in logit space"):
        mb.BalanceConfig(bias_update="sign", fold_share=0.5)
