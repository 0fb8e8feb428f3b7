"""Where a fold edit lands, and what a caller learns it took (moe_balance.weights)."""

from __future__ import annotations

import torch

from moe_balance.weights import add_to_param, engine_of


def test_plain_fp32_takes_the_edit_whole():
    param = torch.nn.Parameter(torch.full((4, 8), 0.02))
    assert add_to_param(param, torch.full((4, 8), 1e-6, dtype=torch.float64)) is None
    assert engine_of(param) == "plain" and torch.allclose(param.detach(), torch.full((4, 8), 0.020001))


def test_plain_bf16_reports_what_rounding_kept():
    param = torch.nn.Parameter(torch.full((4, 8), 0.02, dtype=torch.bfloat16))
    before = param.detach().float().clone()
    delta = torch.tensor([1e-5, 1e-4, 1e-3, 1e-2])[:, None].expand(4, 8)
    taken = add_to_param(param, delta)
    torch.testing.assert_close(taken, param.detach().float() - before, rtol=0, atol=0)
    assert taken[0].abs().max() == 0 and taken[3].abs().min() > 0  # the smallest rounds away, the largest lands


def test_a_zero_parameter_whose_master_lives_on_another_rank_is_no_plain_one():
    """ZeRO-1/2 set ``_hp_mapping`` on every parameter, None where this rank holds no fragment of the fp32
    master: the rank edits its model copy and reports nothing taken, as the owner rank does, so both keep the
    same bias (a plain bf16 report here made the ranks' biases differ)."""
    param = torch.nn.Parameter(torch.full((4, 8), 0.02, dtype=torch.bfloat16))
    param._hp_mapping = None
    assert engine_of(param) == "zero12"
    assert add_to_param(param, torch.full((4, 8), 1e-2)) is None
    assert bool((param.detach().float() != 0.02).all())
