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


# Adaptive step of the quantile rule (per expert, in [GAIN_MIN, 1]): RProp-like factors. Measured on the
# quality benchmark's routers; in steady state with 1k-token batches the gain settles near its floor.
GAIN_GROW, GAIN_SHRINK, GAIN_MIN = 1.5, 0.5, 0.1


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
                 last_sign_LE: torch.Tensor, quantile_range_L: torch.Tensor, quantile_gain_LE: torch.Tensor) -> None:
        self.cfg = cfg
        self.bias_LE = bias_LE  # shared buffers owned by the Balancer module
        self.ema_LE = ema_LE
        self.last_sign_LE = last_sign_LE
        self.quantile_range_L = quantile_range_L
        self.quantile_gain_LE = quantile_gain_LE
        self.flip_share = 0.0

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
        if cfg.quantile_adaptive_step:
            self._adapt_gain(move_LE - move_LE.mean(-1, keepdim=True), active_L)
            move_LE = self.quantile_gain_LE * move_LE
        delta_LE = step_size * (move_LE - move_LE.mean(-1, keepdim=True))  # prices are relative: sum(b) stays put
        self._apply(torch.where(active_L[:, None], delta_LE, torch.zeros_like(delta_LE)))

    def _adapt_gain(self, move_LE: torch.Tensor, active_L: torch.Tensor) -> None:
        """Per-expert share of the price move applied: shrinks while an expert's moves keep reversing
        (prices estimated on one batch, applied to the next: noise) and grows back while they keep one
        direction (a collapse to undo, a router that drifts). Dimensionless, so still no rate."""
        agree_LE = torch.sign(move_LE) * self.last_sign_LE.double()
        gain_LE = torch.where(agree_LE > 0, self.quantile_gain_LE * GAIN_GROW,
                              torch.where(agree_LE < 0, self.quantile_gain_LE * GAIN_SHRINK, self.quantile_gain_LE))
        gain_LE = gain_LE.clamp(GAIN_MIN, 1.0)
        self.quantile_gain_LE.copy_(torch.where(active_L[:, None], gain_LE, self.quantile_gain_LE))

    def _apply(self, delta_LE: torch.Tensor) -> None:
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
