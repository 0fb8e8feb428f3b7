"""Loss-free balancing: the per-expert selection bias and its update rules.

The bias only changes *which* experts are chosen (``argtop_k(s + b)``); gate weights still come
from the unbiased scores. After each optimizer step, with ``load_i`` the tokens expert i received
over the whole step (all micro-batches, all ranks) and the relative error
``e_i = (mean_load - load_i) / mean_load``:

* ``sign``:          ``b_i += u * sign(e_i)``              (Wang et al. 2024, Algorithm 1)
* ``sign_centered``: the sign update minus its mean, so ``sum(b)`` stays put
* ``proportional``:  ``b_i += u * e_i``                    (relative error: u means the same at any batch size)
* ``normalized``:    ``b += u * e / RMS(e)``              (update size independent of the load scale)
* ``quantile``:      ``b = -price``, the price that admits ``T*k/E`` tokens (no rate; see ``quantile.py``)

The rate rules add the bias where the router takes its top-k (probabilities for most softmax
routers, sigmoid scores for the DeepSeek-V3 family): a rate of 1e-3 is small on probabilities of
8-64 experts; on raw logits it is smaller still. The quantile rule has no rate and by default adds
it to log-probabilities / logits (``BalanceConfig.bias_space``).
"""

from __future__ import annotations

import math

import torch

from .config import BalanceConfig
from .quantile import next_range, prices_from_histogram


# quantile_step="filtered": the shares of the price move its shadow filters apply, and the memory of their
# squared prediction errors (about 10 steps). Measured in benchmarks/price_noise.py and docs/benchmarks.md.
SHADOW_GAINS = tuple(2.0 ** -i for i in range(6))
SHADOW_ERROR_EMA = 0.9


def scheduled_rate(cfg: BalanceConfig, step: int) -> float:
    """Update rate at optimizer step ``step`` (0-based), after warm-up and schedule.

    The schedule's clock starts when warm-up ends: with warm-up W and horizon H the rate is 0 for
    steps ``< W``, follows the schedule over steps ``W .. W+H-1`` and is 0 from ``W+H`` on.
    """
    if cfg.bias_freeze or step < cfg.bias_warmup_steps:
        return 0.0
    u = cfg.bias_update_rate
    if cfg.bias_schedule == "constant":
        return u
    horizon = cfg.bias_schedule_steps
    elapsed = step - cfg.bias_warmup_steps
    if elapsed >= horizon:
        return 0.0
    if cfg.bias_schedule == "step":
        return u
    progress = elapsed / horizon
    if cfg.bias_schedule == "linear":
        return u * (1.0 - progress)
    return u * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def load_error(load_LE: torch.Tensor) -> torch.Tensor:
    """Relative error ``(mean - load) / mean`` per layer; zero for layers with no load."""
    mean_L1 = load_LE.mean(-1, keepdim=True)
    return (mean_L1 - load_LE) / mean_L1.clamp_min(1e-12)


def bias_delta(rule: str, error_LE: torch.Tensor, rate: float) -> torch.Tensor:
    """The update ``delta_LE`` of one rule for a relative load error ``error_LE``."""
    if rule == "sign":
        return rate * torch.sign(error_LE)
    if rule == "sign_centered":
        step_LE = torch.sign(error_LE)
        return rate * (step_LE - step_LE.mean(-1, keepdim=True))
    if rule == "proportional":
        return rate * error_LE
    if rule == "normalized":
        rms_L1 = error_LE.pow(2).mean(-1, keepdim=True).sqrt()
        return rate * error_LE / rms_L1.clamp_min(1e-12)
    if rule == "none":
        return torch.zeros_like(error_LE)
    raise ValueError(f"unknown bias_update {rule!r}")


class BiasController:
    """Owns the fp32 bias ``[L, E]`` and the EMA of load fractions; no autograd involved.

    It also remembers the sign of each expert's last move, for the oscillation metric
    (``flip_share``: experts whose update reversed direction this step, among those that moved twice).
    """

    def __init__(self, cfg: BalanceConfig, bias_LE: torch.Tensor, ema_LE: torch.Tensor,
                 last_sign_LE: torch.Tensor, quantile_range_L: torch.Tensor, shadow_GLE: torch.Tensor,
                 shadow_error_GL: torch.Tensor) -> None:
        self.cfg = cfg
        self.bias_LE = bias_LE  # shared buffers owned by the Balancer module
        self.ema_LE = ema_LE
        self.last_sign_LE = last_sign_LE
        self.quantile_range_L = quantile_range_L
        self.shadow_GLE = shadow_GLE  # each shadow filter's price estimate, relative to the bias in effect
        self.shadow_error_GL = shadow_error_GL  # EMA of each shadow's squared miss on the next step's price
        self.flip_share = 0.0
        self.step_share: torch.Tensor | None = None  # share of the price move applied per layer (filtered)

    @torch.no_grad()
    def update(self, counts_LE: torch.Tensor, step: int, has_ema: bool) -> bool:
        """Apply one update from the step's counts. Returns whether the EMA is now initialised."""
        cfg = self.cfg
        fractions_LE = counts_LE / counts_LE.sum(-1, keepdim=True).clamp_min(1.0)
        active_L1 = counts_LE.sum(-1, keepdim=True) > 0  # layers that saw no token stay as they are
        if cfg.bias_ema > 0:
            if has_ema:
                blended = cfg.bias_ema * self.ema_LE + (1 - cfg.bias_ema) * fractions_LE
            else:
                blended = fractions_LE
            self.ema_LE.copy_(torch.where(active_L1, blended, self.ema_LE))
            load_LE = self.ema_LE
            has_ema = has_ema or bool(active_L1.any())
        else:
            load_LE = fractions_LE
        rate = scheduled_rate(cfg, step)
        if rate == 0.0 or cfg.bias_update == "none":
            return has_ema
        delta_LE = bias_delta(cfg.bias_update, load_error(load_LE.double()), rate)
        self._apply(torch.where(active_L1, delta_LE, torch.zeros_like(delta_LE)))
        return has_ema

    @torch.no_grad()
    def update_quantile(self, hist_LEB: torch.Tensor, capacity_L: torch.Tensor, step: int) -> None:
        """Quantile Balancing (see :mod:`moe_balance.quantile`): set each bias to the price that admits
        ``capacity`` tokens, blended by ``bias_ema``; the schedule scales the move (1 = set)."""
        cfg = self.cfg
        rate = scheduled_rate(cfg, step)
        active_L = capacity_L > 0
        q_LE, clamped_LE = prices_from_histogram(hist_LEB, capacity_L.clamp_min(1.0), self.quantile_range_L)
        self.quantile_range_L.copy_(torch.where(active_L, next_range(self.quantile_range_L, q_LE, clamped_LE),
                                                self.quantile_range_L))
        if rate == 0.0:
            return
        step_size = (rate / cfg.bias_update_rate) * (1.0 - cfg.bias_ema)
        move_LE = -q_LE
        move_LE = move_LE - move_LE.mean(-1, keepdim=True)  # prices are relative: sum(b) stays put
        if cfg.quantile_step == "filtered":
            gains_G = torch.tensor(SHADOW_GAINS, dtype=torch.float64, device=move_LE.device)
            miss_GLE = move_LE[None] - self.shadow_GLE
            self.step_share = self._best_shadow_gain(gains_G, miss_GLE, active_L)
            move_LE = self.step_share[:, None] * move_LE
        applied_LE = self._apply(torch.where(active_L[:, None], step_size * move_LE, torch.zeros_like(move_LE)))
        if cfg.quantile_step == "filtered":
            followed_GLE = self.shadow_GLE + gains_G[:, None, None] * miss_GLE - applied_LE[None]
            self.shadow_GLE.copy_(torch.where(active_L[None, :, None], followed_GLE, self.shadow_GLE))

    def _best_shadow_gain(self, gains_G: torch.Tensor, miss_GLE: torch.Tensor, active_L: torch.Tensor) -> torch.Tensor:
        """Per layer, the gain of the shadow filter with the smallest recent squared miss.

        Each shadow ``g`` tracks the price the steps' tokens ask for (the bias in effect plus the full move
        ``m_t``) with its own gain: ``S <- S + g (y_t - S)``. Those prices do not depend on the bias actually
        applied, so every shadow is a valid filter of the same sequence, and the one that has lately predicted
        each next step's price best has the right gain for the present mix of sampling noise (a price set on one
        batch's tokens reverses on the next: small gains win) and real change (a collapse, a drifting router:
        gain 1 wins). A fixed EMA or rate would pick one mix for the whole run; this is the Kalman gain found by
        trying. All from all-reduced counts: every rank chooses the same, no communication.
        """
        error_GL = miss_GLE.pow(2).mean(-1)
        blended_GL = SHADOW_ERROR_EMA * self.shadow_error_GL + (1 - SHADOW_ERROR_EMA) * error_GL
        self.shadow_error_GL.copy_(torch.where(active_L[None], blended_GL, self.shadow_error_GL))
        return gains_G[self.shadow_error_GL.argmin(0)]  # ties (the first step): the largest gain

    def _apply(self, delta_LE: torch.Tensor) -> torch.Tensor:
        """Add ``delta_LE`` (clamped to ``bias_clamp``); returns the change that was made."""
        old_LE = self.bias_LE.double()
        new_bias = old_LE + delta_LE
        if self.cfg.bias_clamp is not None:
            new_bias = new_bias.clamp(-self.cfg.bias_clamp, self.cfg.bias_clamp)
        self.bias_LE.copy_(new_bias.to(self.bias_LE.dtype))
        sign_LE = torch.sign(self.bias_LE.double() - old_LE).to(torch.int8)
        both_moved = (sign_LE != 0) & (self.last_sign_LE != 0)
        flipped = both_moved & (sign_LE != self.last_sign_LE)
        self.flip_share = float(flipped.sum()) / max(1, int(both_moved.sum()))
        self.last_sign_LE.copy_(torch.where(sign_LE != 0, sign_LE, self.last_sign_LE))
        return self.bias_LE.double() - old_LE
