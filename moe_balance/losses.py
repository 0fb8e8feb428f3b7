"""Balance losses as pure functions of one micro-batch of routing.

Conventions (T tokens, E experts, K experts per token):

* ``probs_TE``: the router's own scores normalised over all experts (softmax probabilities, or
  sigmoid affinities divided by their sum, as DeepSeek-V3's balance loss does);
* ``weight_T``: 1 for real tokens, 0 for padding or tokens skipped for non-finite logits;
  every loss is exactly independent of tokens with weight 0;
* ``counts_E``: how many of the valid tokens chose each expert (the real selection, after bias).

Every loss is scaled so that perfectly balanced routing gives its minimum: 1 for the ``f * P``
family (``N * sum_i f_i P_i``), 0 for the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable

import torch


@dataclass
class RoutingBatch:
    """What the losses may read about one micro-batch of one layer."""

    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    weight_T: torch.Tensor
    counts_E: torch.Tensor
    topk_idx_TK: torch.Tensor
    top_k: int
    segment_T: torch.Tensor | None = None
    """Sequence id of each token (``[T]``, ids in ``[0, num_segments)``), for the ``seq`` loss."""
    num_segments: int | None = None
    """An upper bound on the number of sequences (T for packed batches: no host sync to count them)."""
    global_f_E: torch.Tensor | None = None
    """Load fractions scaled to mean 1 over the whole global batch (for ``global_batch``)."""

    @property
    def num_experts(self) -> int:
        return self.probs_TE.shape[-1]

    @property
    def n_tokens(self) -> torch.Tensor:
        return self.weight_T.sum().clamp_min(1.0)


def mean_probs(probs_TE: torch.Tensor, weight_T: torch.Tensor) -> torch.Tensor:
    """P_i: mean score of each expert over the valid tokens (one matrix-vector product)."""
    return (weight_T.to(probs_TE.dtype) @ probs_TE) / weight_T.sum().clamp_min(1.0)


def load_fraction(counts_E: torch.Tensor, top_k: int) -> torch.Tensor:
    """f_i scaled so balanced routing gives 1: ``N * count_i / (K * T)``."""
    total = counts_E.sum().clamp_min(1.0)
    return counts_E * (counts_E.shape[-1] / total)


def switch_loss(b: RoutingBatch) -> torch.Tensor:
    """Switch/GShard ``N * sum_i f_i P_i`` with top-k aware f (Fedus et al. 2021)."""
    f_E = load_fraction(b.counts_E, b.top_k).to(b.probs_TE.dtype)
    return (f_E * mean_probs(b.probs_TE, b.weight_T)).sum()


def global_batch_loss(b: RoutingBatch) -> torch.Tensor:
    """``N * sum_i f_i P_i`` with f from the whole global batch (Qiu et al. 2025, arXiv 2501.11873).

    ``global_f_E`` is constant here; gradients flow through this micro-batch's P only.
    """
    if b.global_f_E is None:
        raise ValueError("global_batch loss needs global_f_E")
    return (b.global_f_E.to(b.probs_TE.dtype) * mean_probs(b.probs_TE, b.weight_T)).sum()


def sequence_loss(b: RoutingBatch) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise loss: the ``f * P`` product per sequence, averaged over sequences.

    Sequences are given by ``segment_T`` (rows of a padded batch, or the pieces of a packed row);
    without them the loss would silently become the batch-wide Switch loss, so it refuses.
    """
    if b.segment_T is None or b.num_segments is None:
        raise ValueError("the 'seq' aux loss needs sequence boundaries (segment_T); none were given")
    num_experts, S = b.num_experts, b.num_segments
    weight_T = b.weight_T.to(b.probs_TE.dtype)
    p_sum_SE = b.probs_TE.new_zeros(S, num_experts).index_add(0, b.segment_T, weight_T[:, None] * b.probs_TE)
    n_tokens_S = weight_T.new_zeros(S).index_add(0, b.segment_T, weight_T)
    p_SE = p_sum_SE / n_tokens_S.clamp_min(1.0)[:, None]
    counts_SE = sequence_counts(b.topk_idx_TK, b.weight_T, b.segment_T, S, num_experts)
    f_SE = counts_SE * (num_experts / counts_SE.sum(1, keepdim=True).clamp_min(1.0))
    per_seq_S = (f_SE.to(p_SE.dtype) * p_SE).sum(1)
    has_tokens_S = (n_tokens_S > 0).to(per_seq_S.dtype)
    return (per_seq_S * has_tokens_S).sum() / has_tokens_S.sum().clamp_min(1.0)


def sequence_counts(topk_idx_TK: torch.Tensor, weight_T: torch.Tensor, segment_T: torch.Tensor,
                    num_segments: int, num_experts: int) -> torch.Tensor:
    """Per-sequence expert counts ``[S, E]`` by one flat scatter_add (compile friendly)."""
    K = topk_idx_TK.shape[-1]
    flat_TK = segment_T.long()[:, None] * num_experts + topk_idx_TK.long()
    w_TK = weight_T.to(torch.float32)[:, None].expand(-1, K)
    counts = torch.zeros(num_segments * num_experts, dtype=torch.float32, device=weight_T.device)
    return counts.scatter_add_(0, flat_TK.reshape(-1), w_TK.reshape(-1)).reshape(num_segments, num_experts)


def segments_from_seq_len(num_tokens: int, seq_len: int, device: torch.device | str | None = None
                          ) -> tuple[torch.Tensor, int]:
    """``(segment_T, num_segments)`` for ``num_tokens`` tokens in rows of ``seq_len``."""
    return torch.arange(num_tokens, device=device) // seq_len, num_tokens // seq_len


def _cv_squared(x_E: torch.Tensor) -> torch.Tensor:
    mean = x_E.mean()
    return x_E.var(unbiased=False) / (mean * mean).clamp_min(1e-20)


def importance_cv_loss(b: RoutingBatch) -> torch.Tensor:
    """Shazeer et al. 2017: squared coefficient of variation of expert importance."""
    return _cv_squared((b.weight_T[:, None] * b.probs_TE).sum(0))


def soft_load(b: RoutingBatch) -> torch.Tensor:
    """Differentiable load: the score mass each expert receives from the tokens that chose it."""
    picked_TK = b.probs_TE.gather(-1, b.topk_idx_TK.long()) * b.weight_T[:, None]
    load_E = torch.zeros(b.num_experts, dtype=picked_TK.dtype, device=picked_TK.device)
    return load_E.index_add(0, b.topk_idx_TK.reshape(-1).long(), picked_TK.reshape(-1))


def load_cv_loss(b: RoutingBatch) -> torch.Tensor:
    """Squared CV of the (differentiable) soft load, the load half of Shazeer et al. 2017."""
    return _cv_squared(soft_load(b))


def kl_uniform_loss(b: RoutingBatch) -> torch.Tensor:
    """KL(importance || uniform) = log N - H(P); 0 when the mean scores are uniform."""
    p_E = mean_probs(b.probs_TE, b.weight_T)
    return (p_E * torch.log((p_E * b.num_experts).clamp_min(1e-20))).sum()


def entropy_loss(b: RoutingBatch) -> torch.Tensor:
    """1 - H(load)/log N on the normalised soft load of the chosen experts; 0 when balanced."""
    load_E = soft_load(b)
    q_E = load_E / load_E.sum().clamp_min(1e-20)
    entropy = -(q_E * torch.log(q_E.clamp_min(1e-20))).sum()
    return 1.0 - entropy / math.log(b.num_experts)


def z_loss(logits_TE: torch.Tensor, weight_T: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2`` over valid tokens."""
    lse_T = torch.logsumexp(logits_TE.float(), dim=-1)
    return (weight_T * lse_T * lse_T).sum() / weight_T.sum().clamp_min(1.0)


AUX_LOSS_FNS: dict[str, Callable[[RoutingBatch], torch.Tensor]] = {
    "switch": switch_loss,
    "seq": sequence_loss,
    "global_batch": global_batch_loss,
    "importance_cv": importance_cv_loss,
    "load_cv": load_cv_loss,
    "kl_uniform": kl_uniform_loss,
    "entropy": entropy_loss,
}


def aux_loss(name: str, batch: RoutingBatch) -> torch.Tensor:
    """Compute the auxiliary loss called ``name`` (see ``AUX_LOSS_FNS``)."""
    try:
        fn = AUX_LOSS_FNS[name]
    except KeyError:
        raise ValueError(f"unknown aux_loss {name!r}; choose one of {sorted(AUX_LOSS_FNS)}") from None
    return fn(batch)


def scores_to_probs(logits_TE: torch.Tensor, score_func: str,
                    scores_TE: torch.Tensor | None = None) -> torch.Tensor:
    """Scores normalised over all experts, in fp32, from the router's own scores when given."""
    if scores_TE is None:
        if score_func == "softmax":
            return torch.softmax(logits_TE.float(), dim=-1)
        scores_TE = torch.sigmoid(logits_TE.float())
    scores_TE = scores_TE.float()
    if score_func == "softmax":
        return scores_TE
    return scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
