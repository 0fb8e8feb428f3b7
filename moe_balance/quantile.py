"""Quantile Balancing: per-expert prices from a quantile of routing margins (no update rate).

Balance is the dual of an assignment problem with one price per expert (Su, "MoE World Tour 6:
optimal allocation", 2026; Megatron-Core ``moe_router_load_balancing_type="quantile_balancing"``).
Tokens route by ``argtop_k(s + b)``; with ``b = -beta`` the bias *is* the negated price. For a token
t its cutoff ``alpha_t`` is its (k+1)-th biased score; relative to the current bias, token t keeps
(or would take) expert j iff ``r_tj = s_tj + b_j - alpha_t > 0``. Moving expert j's bias by ``-q_j``
admits exactly the tokens with ``r_tj > q_j``, so the price that admits the balanced share
``C = T * k / E`` is the (C+1)-th largest ``r_tj`` over the tokens.

Quantiles do not add up across micro-batches and ranks, histograms do: every router call adds the
``r_tj`` of its valid tokens to a per-expert histogram on ``[-R, R]`` (plus an underflow and an
overflow bin). The step's single all-reduce sums the histograms, so the price is the quantile over
the whole window: gradient accumulation and data-parallel ranks give exactly the one-big-batch bias
(margins of a token depend only on that token and the bias). ``R`` adapts per layer: doubled when
a price lands outside it, halved when every price needs less than an eighth of it.
"""

from __future__ import annotations

import torch


def relative_margins(scores_TE: torch.Tensor, bias_E: torch.Tensor, top_k: int) -> torch.Tensor:
    """``r_TE = s + b - alpha`` with ``alpha_t`` the token's (k+1)-th biased score (fp32)."""
    biased_TE = scores_TE.float() + bias_E.float()
    alpha_T = biased_TE.topk(top_k + 1, dim=-1).values[:, top_k]
    return biased_TE - alpha_T[:, None]


def margin_histogram(scores_TE: torch.Tensor, bias_E: torch.Tensor, weight_T: torch.Tensor, top_k: int,
                     range_: torch.Tensor, bins: int) -> torch.Tensor:
    """``[E, bins + 2]`` counts of the valid tokens' margins: underflow, ``bins`` on ``[-R, R]``, overflow.

    One scatter_add, no host sync (``range_`` is a 0-d tensor).
    """
    num_experts = scores_TE.shape[-1]
    margins_TE = relative_margins(scores_TE, bias_E, top_k)
    position_TE = (margins_TE + range_) * (bins / (2 * range_))
    finite_TE = torch.isfinite(margins_TE)  # -inf: an expert this token cannot take (an excluded group)
    bin_TE = position_TE.nan_to_num(0.0, 0.0, 0.0).floor().clamp(-1, bins).long() + 1  # 0 under, bins + 1 over
    flat_TE = bin_TE + torch.arange(num_experts, device=bin_TE.device) * (bins + 2)
    weight_TE = weight_T.to(torch.float64)[:, None] * finite_TE.to(torch.float64)
    hist = torch.zeros(num_experts * (bins + 2), dtype=torch.float64, device=scores_TE.device)
    return hist.scatter_add_(0, flat_TE.reshape(-1), weight_TE.reshape(-1)).reshape(num_experts, bins + 2)


def prices_from_histogram(hist_LEB: torch.Tensor, capacity_L: torch.Tensor,
                          range_L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert price moves ``q_LE`` (admit ``capacity`` tokens above ``q``) and whether each fell
    outside ``[-R, R]`` (clamped to the edge).

    Linear interpolation inside the bin where the count from the top crosses the capacity.
    """
    bins = hist_LEB.shape[-1] - 2
    inner_LEB = hist_LEB[..., 1:-1]
    overflow_LE = hist_LEB[..., -1]
    # at_or_above[i] = tokens with margin >= lower edge of inner bin i (counting from the top)
    above_LEB = inner_LEB.flip(-1).cumsum(-1).flip(-1) + overflow_LE[..., None]
    capacity_LE1 = capacity_L[:, None, None].expand(*hist_LEB.shape[:2], 1)
    # the highest bin whose lower edge still has >= capacity tokens at or above it
    reaches_LEB = above_LEB >= capacity_LE1
    index_LE = (reaches_LEB.long().cumsum(-1).argmax(-1))  # last True (all-False handled below)
    any_LE = reaches_LEB.any(-1)
    above_upper_LE = (above_LEB.gather(-1, index_LE[..., None]).squeeze(-1)
                      - inner_LEB.gather(-1, index_LE[..., None]).squeeze(-1))
    count_in_bin_LE = inner_LEB.gather(-1, index_LE[..., None]).squeeze(-1)
    width_L11 = (2 * range_L / bins)[:, None]
    upper_edge_LE = -range_L[:, None] + (index_LE + 1).double() * width_L11
    needed_LE = capacity_LE1.squeeze(-1) - above_upper_LE
    q_LE = upper_edge_LE - needed_LE / count_in_bin_LE.clamp_min(1e-12) * width_L11
    over_LE = overflow_LE >= capacity_LE1.squeeze(-1)  # even the overflow bin holds enough: price >= R
    q_LE = torch.where(over_LE, range_L[:, None].expand_as(q_LE), q_LE)
    q_LE = torch.where(~any_LE & ~over_LE, -range_L[:, None].expand_as(q_LE), q_LE)  # in the underflow
    clamped_LE = over_LE | ~any_LE
    # Fewer candidates than the capacity (group-limited routing excluded the expert for most tokens): no
    # price can fill it, so it is left where it is rather than pushed without bound.
    undefined_LE = hist_LEB.sum(-1) < capacity_LE1.squeeze(-1)
    q_LE = torch.where(undefined_LE, torch.zeros_like(q_LE), q_LE)
    return q_LE, clamped_LE & ~undefined_LE


def next_range(range_L: torch.Tensor, q_LE: torch.Tensor, clamped_LE: torch.Tensor) -> torch.Tensor:
    """Double ``R`` where a price was clamped, halve it where all moves were below ``R / 8``."""
    grow_L = clamped_LE.any(-1)
    shrink_L = (q_LE.abs().amax(-1) < range_L / 8) & ~grow_L
    factor_L = torch.where(grow_L, torch.full_like(range_L, 2.0),
                           torch.where(shrink_L, torch.full_like(range_L, 0.5), torch.ones_like(range_L)))
    return (range_L * factor_L).clamp(1e-6, 1e6)


__all__ = ["relative_margins", "margin_histogram", "prices_from_histogram", "next_range"]
