"""Small synthetic routers for tests, benchmarks and docs (no model needed)."""

from __future__ import annotations

import torch


class SkewedRouter:
    """A fixed set of tokens whose softmax router prefers low-numbered experts.

    ``logits = base_TE + skew_E + noise`` where ``skew_E`` falls linearly from ``+skew`` to
    ``-skew``; the bias is added to the probabilities before top-k, as most routers do.

    Example:
        >>> r = SkewedRouter(num_tokens=64, num_experts=4, top_k=1)
        >>> logits_TE, idx_TK = r.route(torch.zeros(4))
        >>> idx_TK.shape
        torch.Size([64, 1])
    """

    def __init__(self, num_tokens: int = 4096, num_experts: int = 8, top_k: int = 2, skew: float = 2.0,
                 noise: float = 0.05, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.base_TE = torch.randn(num_tokens, num_experts, generator=gen) * 0.5
        self.skew_E = torch.linspace(skew, -skew, num_experts)
        self.noise, self.top_k, self.gen = noise, top_k, gen

    def route(self, bias_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits_TE = self.base_TE + self.skew_E + self.noise * torch.randn(self.base_TE.shape, generator=self.gen)
        probs_TE = torch.softmax(logits_TE, -1)
        idx_TK = torch.topk(probs_TE + bias_E, self.top_k, dim=-1).indices
        return logits_TE, idx_TK
