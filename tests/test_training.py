"""The bias rule balances a deliberately skewed tiny model on real text, per strategy.

Measured here (600 steps unless a case says otherwise, batch 16x64 bytes, AdamW 1e-3, 8 experts top-2,
held-out MaxVio on 24k tokens): the unbalanced control stays near 2.6-2.9 (collapse on two experts), the sign rule
ends around 0.1-0.45 depending on the architecture. The learning router keeps pulling towards
collapse, so < 0.1 is not reached within a few hundred steps on these tiny models; the asserts
below are the margins we measured, with room for seed noise.
"""

from __future__ import annotations

import pytest

from moe_balance.testing import train_skewed

pytestmark = pytest.mark.slow
STEPS = 600


@pytest.fixture(scope="module")
def control():
    # the collapse holds from the start (measured: MaxVio 2.6-2.9 at 150 and at 600 steps), so the control is short
    return train_skewed("mixtral", 150, bias_update="none")


# DeepSeek-V2's group-limited routing picks groups from unbiased scores; the bias only acts
# inside the chosen groups, so it balances less (measured 0.64 against a control of 2.5).
# DeepSeek-V3 (native bias) with the default rule, which needs a quarter of the steps (0.40 at step 150, measured).
# The generic interception with the default rule is trained in test_quantile (every score space, 60 steps); here
# it runs the sign rule of the Loss-Free paper on DeepSeek-V2.
@pytest.mark.parametrize("model_type, strategy, bound, steps, rule", [
    ("deepseek_v3", "native_bias", 0.6, 150, {}),
    ("deepseek_v2", "group_limited", 0.8, STEPS, {"bias_update": "sign", "bias_update_rate": 1e-3})])
def test_bias_rule_balances_skewed_model(model_type, strategy, bound, steps, rule, control):
    run = train_skewed(model_type, steps, **rule)
    assert run["start_maxvio"] > 1.0
    assert run["end_maxvio"] < bound, run
    assert run["end_maxvio"] < control["end_maxvio"] / 3, (run, control)
    assert run["last_loss"] < run["first_loss"] - 1.0, run  # the LM still learns


def test_control_stays_collapsed(control):
    assert control["start_maxvio"] > 1.0 and control["end_maxvio"] > 1.5, control
