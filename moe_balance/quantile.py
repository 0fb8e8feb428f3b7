"""Quantile Balancing: per-expert prices from a quantile of routing margins (no update rate).

Balance is the dual of an assignment problem with one price per expert (Su, "MoE World Tour 6:
optimal allocation", 2026; Megatron-Core ``moe_router_load_balancing_type="quantile_balancing"``).
Tokens route by ``argtop_k(s + b)``; with ``b = -beta`` the bias *is* the negated price. For a token
t its cutoff ``alpha_t`` is its (k+1)-th biased score for the experts it chose (Megatron's cutoff) and
its k-th for the others (to enter, an expert must beat the weakest chosen one); relative to the current
bias, token t keeps (or would take) expert j iff ``r_tj = s_tj + b_j - alpha_t > 0``. Moving expert j's
bias by ``-q_j`` admits exactly the tokens with ``r_tj > q_j``, so the price that admits the balanced share
``C = T * k / E`` is the (C+1)-th largest ``r_tj`` over the tokens.

Quantiles do not add up across micro-batches and ranks, histograms do: every router call adds the
``r_tj`` of its valid tokens to a per-expert histogram with geometric bins on ``[-R, R]`` (plus an
underflow and an overflow bin). The step's single all-reduce sums the histograms, so the price is the
quantile over the whole window: gradient accumulation and data-parallel ranks give exactly the
one-big-batch bias (margins of a token depend only on that token and the bias). ``R`` starts at 1 and
is quadrupled per layer when a price lands outside it (raw-logit routers).
"""

from __future__ import annotations

import torch


def relative_margins(scores_TE: torch.Tensor, bias_E: torch.Tensor, top_k: int) -> torch.Tensor:
    """``r_TE = s + b - alpha`` (fp32): ``alpha_t`` is the token's (k+1)-th biased score for the experts it
    chose and its k-th for the others, so ``r_tj > q`` exactly when j is chosen with ``b_j - q``."""
    biased_TE = scores_TE.float() + bias_E.float()
    top_TK1 = biased_TE.topk(top_k + 1, dim=-1).values
    kth_T1, next_T1 = top_TK1[:, top_k - 1:top_k], top_TK1[:, top_k:]
    # A chosen expert stays while it beats the best unchosen one ((k+1)-th); an unchosen one enters only
    # by beating the weakest chosen one (k-th). With one (k+1)-th cutoff for both, every token's
    # runner-up sits at margin 0 and an underloaded expert's price stalls there.
    return torch.where(biased_TE >= kth_T1, biased_TE - next_T1, biased_TE - kth_T1)


BIN_STEP = 0.5  # a factor of 1.41 per bin; with 128 bins the range spans 2^32


def bin_edges(range_L: torch.Tensor, bins: int) -> torch.Tensor:
    """``[L, bins + 1]`` edges, symmetric and geometric: ``0, +-R*2^(-j/2)``, dense near 0.

    A price move is needed at every scale (a collapsed start moves by tenths of a probability, a balanced
    router of 256 experts by millionths); geometric bins give the same relative resolution (a factor of
    1.41 per bin) over ``2^(bins/4)``, so one range fits every step and score space. An earlier linear
    layout with a range that shrank after small moves could not follow a large move later and oscillated
    (64 experts stuck near MaxVio 7 for several steps; now 0.1-0.2 within 4 steps).
    """
    half = bins // 2
    exponents = torch.arange(half - 1, -1, -1, dtype=torch.float64, device=range_L.device) * -BIN_STEP
    positive_LH = range_L.double()[:, None] * torch.pow(2.0, exponents)[None, :]
    zero_L1 = torch.zeros_like(range_L, dtype=torch.float64)[:, None]
    return torch.cat([-positive_LH.flip(-1), zero_L1, positive_LH], dim=-1)


def margin_histogram(scores_TE: torch.Tensor, bias_E: torch.Tensor, weight_T: torch.Tensor, top_k: int,
                     range_: torch.Tensor, bins: int) -> torch.Tensor:
    """``[E, bins + 2]`` counts of the valid tokens' margins: underflow, ``bins`` between the edges of
    :func:`bin_edges`, overflow. The bin comes from ``log2 |m|`` (the edges are geometric), then one
    scatter_add; no host sync (``range_`` is a 0-d tensor).
    """
    num_experts, half = scores_TE.shape[-1], bins // 2
    margins_TE = relative_margins(scores_TE, bias_E, top_k).nan_to_num(nan=0.0, posinf=3e38)
    # -inf: an expert this token cannot take (an excluded group); it is not counted at all
    weight_TE = weight_T.to(torch.float32)[:, None] * (margins_TE > float("-inf")).to(torch.float32)
    ratio_TE = margins_TE.abs() / range_.to(margins_TE.dtype)
    steps_TE = (half + torch.log2(ratio_TE) / BIN_STEP).floor().clamp(0, half).long()
    bin_TE = torch.where(margins_TE >= 0, half + 1 + steps_TE, half - steps_TE)  # 0 under .. bins + 1 over
    flat_TE = bin_TE + torch.arange(num_experts, device=bin_TE.device) * (bins + 2)
    hist = torch.zeros(num_experts * (bins + 2), dtype=torch.float32, device=scores_TE.device)
    hist.scatter_add_(0, flat_TE.reshape(-1), weight_TE.reshape(-1))
    return hist.reshape(num_experts, bins + 2).double()  # per micro-batch counts are exact in fp32


def prices_from_histogram(hist_LEB: torch.Tensor, capacity_L: torch.Tensor,
                          range_L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert price moves ``q_LE`` (admit ``capacity`` tokens above ``q``) and whether each fell
    outside ``[-R, R]`` (clamped to the edge).

    Linear interpolation inside the bin where the count from the top crosses the capacity.
    """
    bins = hist_LEB.shape[-1] - 2
    edges_L1B = bin_edges(range_L, bins)[:, None, :]  # [L, 1, bins + 1]
    inner_LEB = hist_LEB[..., 1:-1]
    overflow_LE = hist_LEB[..., -1]
    # at_or_above[i] = tokens with margin >= lower edge of inner bin i (counting from the top)
    above_LEB = inner_LEB.flip(-1).cumsum(-1).flip(-1) + overflow_LE[..., None]
    capacity_LE = capacity_L[:, None].expand(*hist_LEB.shape[:2])
    # the highest bin whose lower edge still has >= capacity tokens at or above it
    reaches_LEB = above_LEB >= capacity_LE[..., None]
    index_LE1 = reaches_LEB.long().cumsum(-1).argmax(-1, keepdim=True)  # last True (all-False handled below)
    any_LE = reaches_LEB.any(-1)
    count_in_bin_LE = inner_LEB.gather(-1, index_LE1).squeeze(-1)
    above_upper_LE = above_LEB.gather(-1, index_LE1).squeeze(-1) - count_in_bin_LE
    edges_LEB = edges_L1B.expand(*hist_LEB.shape[:2], bins + 1)
    lower_LE = edges_LEB.gather(-1, index_LE1).squeeze(-1)
    upper_LE = edges_LEB.gather(-1, index_LE1 + 1).squeeze(-1)
    needed_LE = capacity_LE - above_upper_LE
    q_LE = upper_LE - needed_LE / count_in_bin_LE.clamp_min(1e-12) * (upper_LE - lower_LE)
    over_LE = overflow_LE >= capacity_LE  # even the overflow bin holds enough: price >= R
    q_LE = torch.where(over_LE, range_L[:, None].expand_as(q_LE), q_LE)
    q_LE = torch.where(~any_LE & ~over_LE, -range_L[:, None].expand_as(q_LE), q_LE)  # in the underflow
    clamped_LE = over_LE | ~any_LE
    # Fewer candidates than the capacity (group-limited routing excluded the expert for most tokens): no
    # price can fill it, so it is left where it is rather than pushed without bound.
    undefined_LE = hist_LEB.sum(-1) < capacity_LE
    q_LE = torch.where(undefined_LE, torch.zeros_like(q_LE), q_LE)
    return q_LE, clamped_LE & ~undefined_LE


def next_range(range_L: torch.Tensor, q_LE: torch.Tensor, clamped_LE: torch.Tensor) -> torch.Tensor:
    """Quadruple ``R`` where a price fell outside it; geometric bins keep small moves resolved anyway."""
    grow_L = clamped_LE.any(-1)
    return torch.where(grow_L, range_L * 4.0, range_L).clamp(1e-6, 1e6)


__all__ = ["relative_margins", "bin_edges", "margin_histogram", "prices_from_histogram", "next_range"]
