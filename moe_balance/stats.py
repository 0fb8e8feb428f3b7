"""Balance metrics computed from expert counts (no autograd, any device)."""

from __future__ import annotations

import math

import torch


def maxvio(counts_LE: torch.Tensor) -> torch.Tensor:
    """``(max_i load_i - mean) / mean`` per layer (Wang et al. 2024); 0 for layers with no load."""
    mean_L = counts_LE.mean(-1)
    return (counts_LE.amax(-1) - mean_L) / mean_L.clamp_min(1e-12)


def coefficient_of_variation(counts_LE: torch.Tensor) -> torch.Tensor:
    return counts_LE.std(-1, unbiased=False) / counts_LE.mean(-1).clamp_min(1e-12)


def normalized_entropy(counts_LE: torch.Tensor) -> torch.Tensor:
    """Entropy of the load distribution over log(E): 1 is perfectly even."""
    p_LE = counts_LE / counts_LE.sum(-1, keepdim=True).clamp_min(1e-12)
    entropy_L = -(p_LE * torch.log(p_LE.clamp_min(1e-30))).sum(-1)
    return entropy_L / math.log(counts_LE.shape[-1])


def dead_experts(counts_LE: torch.Tensor) -> torch.Tensor:
    return (counts_LE == 0).sum(-1)


def min_max_ratio(counts_LE: torch.Tensor) -> torch.Tensor:
    return counts_LE.amin(-1) / counts_LE.amax(-1).clamp_min(1e-12)


def dropped_fraction(counts_E: torch.Tensor, n_assignments: torch.Tensor,
                     capacity_factor: float) -> torch.Tensor:
    """Share of assignments over capacity ``ceil(cf * T * k / E)`` (GShard); 0 without tokens."""
    capacity = torch.ceil(capacity_factor * n_assignments / counts_E.shape[-1])
    over = (counts_E - capacity).clamp_min(0).sum()
    return over / n_assignments.clamp_min(1.0)


def summarize(counts_LE: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-layer metrics of one window of counts ``[L, E]``."""
    counts_LE = counts_LE.double()
    return {
        "maxvio": maxvio(counts_LE),
        "cv": coefficient_of_variation(counts_LE),
        "load_entropy": normalized_entropy(counts_LE),
        "dead_experts": dead_experts(counts_LE).double(),
        "min_max_ratio": min_max_ratio(counts_LE),
    }
