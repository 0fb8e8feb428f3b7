"""Adaptive auxiliary-loss weight: a bounded multiplicative controller on measured MaxVio.

A fixed weight is fragile (too small: collapse; too large: hurts the LM loss). After each
optimizer step the weight is multiplied by ``1 + rate`` while the global MaxVio is above the
target and divided by it while below, and kept within ``[min_coef, max_coef]``.
"""

from __future__ import annotations

import math

from .config import BalanceConfig


class AdaptiveCoef:
    """State: the current coefficient. ``update`` takes the step's MaxVio (averaged over layers)."""

    def __init__(self, cfg: BalanceConfig) -> None:
        self.cfg = cfg
        self.coef = min(max(cfg.aux_loss_coef, cfg.adaptive_min_coef), cfg.adaptive_max_coef) \
            if cfg.adaptive_aux else cfg.aux_loss_coef

    def update(self, maxvio: float) -> float:
        cfg = self.cfg
        if not cfg.adaptive_aux or not math.isfinite(maxvio):
            return self.coef
        factor = 1.0 + cfg.adaptive_rate
        new = self.coef * factor if maxvio > cfg.adaptive_target_maxvio else self.coef / factor
        self.coef = min(max(new, cfg.adaptive_min_coef), cfg.adaptive_max_coef)
        return self.coef
