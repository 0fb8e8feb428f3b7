"""`BalanceConfig`: every knob of the balancer, validated at construction.

The same keys are used by ``BalanceConfig.from_dict`` and by the ``"moe_balance"`` entry of a
DeepSpeed config, so one JSON object configures every integration.

Defaults and their sources:

* ``bias_update="quantile"``: Quantile Balancing (no rate; the same default for probabilities, sigmoid
  scores, raw logits and DeepSpeed gates). ``"sign"`` with ``bias_update_rate=1e-3`` is Loss-Free
  Balancing (Wang et al. 2024, arXiv 2408.15664: u = 1e-3 best; 1e-4 is slow, 1e-2 oscillates).
* ``aux_loss="none"``: the loss-free bias is the default force; turn an auxiliary loss on
  explicitly. Typical weights: Switch 1e-2, DeepSeek-V3 sequence-wise 1e-4.
* ``z_loss_coef=0``: ST-MoE (Zoph et al. 2022) uses 1e-3 when enabled.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Mapping

AUX_LOSSES = ("none", "switch", "seq", "global_batch", "importance_cv", "load_cv",
              "kl_uniform", "entropy")
BIAS_UPDATES = ("none", "sign", "sign_centered", "proportional", "normalized", "quantile")
BIAS_SPACES = ("auto", "scores", "logits")
BIAS_SCHEDULES = ("constant", "step", "linear", "cosine")
SCORE_FUNCS = ("softmax", "sigmoid")
NAN_POLICIES = ("skip", "raise")
QUANTILE_STEPS = ("filtered", "full")


DEFAULT_FOLD_SHARE = 1.0
"""Each step the weights take the whole bias: they carry the routing at every step (a checkpoint saved mid-run,
or weights synced to an RL rollout engine, routes as the trainer does). Measured against 0.1 and 0.3, which keep
a remainder that agrees with the trained routing on only 93-95% of choices when folded at the end
(docs/serving.md)."""


def resolved_bias_space(bias_update: str, bias_space: str) -> str:
    """``scores`` or ``logits``: where a bias of this rule lives (``auto``: logits for quantile)."""
    if bias_space == "auto":
        return "logits" if bias_update == "quantile" else "scores"
    return bias_space


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"BalanceConfig.{name}={value!r} is not allowed; choose one of {list(allowed)}")


def _number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise ValueError(f"BalanceConfig.{name}={value!r} must be {kind}")
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low}")
        if value < low or (low_open and value == low):
            raise ValueError(f"BalanceConfig.{name}={value!r} must be {kind} {' and '.join(bounds)}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high}")
        if value > high or (high_open and value == high):
            raise ValueError(f"BalanceConfig.{name}={value!r} must be {kind} {' and '.join(bounds)}")


@dataclass
class BalanceConfig:
    """Configuration of a :class:`~moe_balance.Balancer`.

    Example:
        >>> import moe_balance as mb
        >>> cfg = mb.BalanceConfig(aux_loss="global_batch", aux_loss_coef=1e-3)
        >>> mb.BalanceConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    # --- auxiliary loss (gradient-based balancing) ---
    aux_loss: str = "none"
    """Auxiliary balance loss added through the router outputs (docs/methods.md). Coefficients apply per
    layer; layer losses are summed (Megatron)."""
    aux_loss_coef: float = 1e-3
    """Weight of the auxiliary loss per layer (Switch used 1e-2, DeepSeek-V3's sequence-wise loss 1e-4)."""
    z_loss_coef: float = 0.0
    """Router z-loss ``mean(logsumexp(logits)^2)`` weight (ST-MoE uses 1e-3)."""
    score_func: str = "softmax"
    """How router logits become scores when an adapter does not pass the router's own scores."""

    # --- adaptive auxiliary-loss weight (controller on the measured MaxVio) ---
    adaptive_aux: bool = False
    """Move ``aux_loss_coef`` with the measured MaxVio (needs an ``aux_loss``); off: the configured
    coefficient always wins over a checkpoint's."""
    adaptive_target_maxvio: float = 0.1
    """``adaptive_aux``: the window MaxVio above which the coefficient grows."""
    adaptive_rate: float = 0.1
    """Multiplicative step: coef *= (1 + rate) above target, /= (1 + rate) below."""
    adaptive_min_coef: float = 1e-5
    """``adaptive_aux``: lower bound of the coefficient."""
    adaptive_max_coef: float = 1e-1
    """``adaptive_aux``: upper bound of the coefficient (not below ``adaptive_min_coef``)."""

    # --- loss-free bias controller ---
    bias_update: str = "quantile"
    """Loss-free bias rule applied after each optimizer step (docs/methods.md). ``quantile`` (default) needs
    no rate and works in any score space; the rate rules (``sign`` ...) keep their paper semantics: the rate
    is in the units of the scores."""
    bias_update_rate: float = 1e-3
    """Rate of the rate rules. For ``quantile`` only the schedule's shape matters (rate / this = share of
    the price move applied; 1 = set the price)."""
    bias_space: str = "auto"
    """What the bias is added to for the selection. ``scores``: the scores the router ranks (probabilities
    for softmax routers; Loss-Free's definition, in which the rate rules' rates are given); ``logits``:
    their logit-space reading (log-probabilities of a softmax, the logits of a sigmoid; routers that rank
    raw logits are unchanged). ``auto``: ``logits`` for ``quantile``, ``scores`` for the rate rules.
    Routers with their own bias buffer (DeepSeek-V3 family) always use their own space (the checkpoint's).
    Collapsed softmax routers have ~0 probability for most experts, so in ``scores`` the bias alone orders
    them and clusters of tokens move together; measured in docs/methods.md."""
    bias_schedule: str = "constant"
    """``constant``; ``step``: rate drops to 0 after ``bias_schedule_steps`` updates (DeepSeek-V3);
    ``linear``/``cosine``: decay to 0 over ``bias_schedule_steps``. The schedule starts when warm-up ends."""
    bias_schedule_steps: int = 0
    """Bias updates until a ``step``/``linear``/``cosine`` schedule reaches 0 (must be > 0 for those)."""
    bias_warmup_steps: int = 0
    """Optimizer steps before the first bias update (loads are still measured)."""
    bias_ema: float = 0.0
    """EMA factor on per-step load fractions before the error is formed (0 = this step only)."""
    bias_clamp: float | None = None
    """Keep ``|b| <= bias_clamp``; None = unbounded."""
    bias_freeze: bool = False
    """Keep the bias as it is (loads are still measured and logged)."""
    fold_share: float | None = None
    """Share of the bias the generic routers apply that is moved into their weights after every step
    (bias in logit space; :mod:`moe_balance.fold`): the router's linear bias takes it exactly where it has one,
    else the weight takes ``b a^T`` with ``a . x ~ 1`` on the router inputs (estimated online). The controller
    keeps pricing from the current scores, so it corrects what the fold misses. The weights then carry the
    routing during training, not only at its end: a checkpoint saved at any step routes as trained in stock
    transformers, vLLM and SGLang (the ``routing_differ`` metric says how closely), with no need to know the
    run's length. None = auto: 1 when the bias is in logit space (the quantile default), else 0 (a bias on
    probabilities is no constant in logits); below 1 a remainder stays in the bias and is folded at the end of
    training, less exactly (docs/serving.md); 0 = off, the bias lives beside the weights and is lost when the
    model is served."""
    quantile_step: str = "filtered"
    """``quantile``: how much of each step's price move is applied. ``filtered`` (default): per layer, the share
    (1, 1/2, ..., 1/32) whose shadow filter has lately predicted each step's price best, so 1 while the price
    really moves (a collapse to undo, a drifting router) and less once the moves are mostly one batch's sampling
    noise: fast from a collapse and quiet at the end, with no rate to tune (docs/methods.md). ``full``: set the
    price every step (Megatron-Core's quantile balancing); the bias then carries each step's noise."""
    quantile_bins: int = 128
    """``quantile``: histogram bins per expert for the margins (all-reduced with the counts)."""
    expert_parallel_size: int = 1
    """Experts split in contiguous blocks over this many ranks; reports the busiest rank's excess load."""

    # --- metrics and robustness ---
    capacity_factors: tuple[float, ...] = (1.0, 1.25)
    """Capacity factors for the dropped-token metric (tokens over ``cf * T * k / E``)."""
    nan_policy: str = "skip"
    """``skip``: tokens with non-finite logits are excluded and counted in ``skipped_tokens``
    (warned at ``step``); ``raise``: ``step`` raises. Neither syncs in ``observe``."""
    log_per_layer: bool = False
    """Also report every layer's metrics as ``layer<i>/<name>``."""

    def __post_init__(self) -> None:
        if isinstance(self.capacity_factors, list):
            self.capacity_factors = tuple(self.capacity_factors)
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ``ValueError`` naming the first bad one."""
        _choice("aux_loss", self.aux_loss, AUX_LOSSES)
        _choice("bias_update", self.bias_update, BIAS_UPDATES)
        _choice("bias_schedule", self.bias_schedule, BIAS_SCHEDULES)
        _choice("bias_space", self.bias_space, BIAS_SPACES)
        _choice("score_func", self.score_func, SCORE_FUNCS)
        _choice("nan_policy", self.nan_policy, NAN_POLICIES)
        _choice("quantile_step", self.quantile_step, QUANTILE_STEPS)
        _number("aux_loss_coef", self.aux_loss_coef, low=0)
        _number("z_loss_coef", self.z_loss_coef, low=0)
        _number("adaptive_target_maxvio", self.adaptive_target_maxvio, low=0)
        _number("adaptive_rate", self.adaptive_rate, low=0, low_open=True)
        _number("adaptive_min_coef", self.adaptive_min_coef, low=0)
        _number("adaptive_max_coef", self.adaptive_max_coef, low=0)
        if self.adaptive_min_coef > self.adaptive_max_coef:
            raise ValueError(
                f"BalanceConfig.adaptive_min_coef={self.adaptive_min_coef!r} must be <= "
                f"adaptive_max_coef={self.adaptive_max_coef!r}")
        _number("bias_update_rate", self.bias_update_rate, low=0)
        if self.fold_share is not None:
            _number("fold_share", self.fold_share, low=0, high=1)
        if (self.fold_share or 0) > 0 and (not self.uses_bias or not self.ranks_logits):
            raise ValueError(f"BalanceConfig.fold_share={self.fold_share!r} needs a bias in logit space "
                             f"(bias_update in {list(BIAS_UPDATES[1:])} with bias_space='logits', or 'auto' with "
                             f"'quantile'); got bias_update={self.bias_update!r}, bias_space={self.bias_space!r}")
        _number("bias_schedule_steps", self.bias_schedule_steps, low=0, integer=True)
        if self.bias_schedule != "constant" and self.bias_schedule_steps == 0:
            raise ValueError(
                f"BalanceConfig.bias_schedule_steps=0 must be > 0 when bias_schedule="
                f"{self.bias_schedule!r} (the step where the rate reaches 0)")
        _number("bias_warmup_steps", self.bias_warmup_steps, low=0, integer=True)
        _number("quantile_bins", self.quantile_bins, low=4, high=4096, integer=True)
        _number("expert_parallel_size", self.expert_parallel_size, low=1, integer=True)
        _number("bias_ema", self.bias_ema, low=0, high=1, high_open=True)
        if self.bias_clamp is not None:
            _number("bias_clamp", self.bias_clamp, low=0, low_open=True)
        for name in ("adaptive_aux", "bias_freeze", "log_per_layer"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BalanceConfig.{name}={getattr(self, name)!r} must be true or false")
        if not isinstance(self.capacity_factors, tuple) or not self.capacity_factors:
            raise ValueError(
                f"BalanceConfig.capacity_factors={self.capacity_factors!r} must be a non-empty list")
        for cf in self.capacity_factors:
            _number("capacity_factors", cf, low=0, low_open=True)
        if self.adaptive_aux and self.aux_loss == "none":
            raise ValueError("BalanceConfig.adaptive_aux=True needs an aux_loss other than 'none'; "
                             f"choose one of {list(AUX_LOSSES[1:])}")

    # --- serialisation ---
    @property
    def uses_bias(self) -> bool:
        return self.bias_update != "none"

    @property
    def uses_quantile(self) -> bool:
        return self.bias_update == "quantile"

    @property
    def ranks_logits(self) -> bool:
        """Whether interception adds the bias in logit space (see ``bias_space``)."""
        return resolved_bias_space(self.bias_update, self.bias_space) == "logits"

    @property
    def uses_aux(self) -> bool:
        return self.aux_loss != "none"

    @property
    def fold_share_resolved(self) -> float:
        """``fold_share`` resolved (None: ``DEFAULT_FOLD_SHARE`` with a bias in logit space, else 0)."""
        if self.fold_share is not None:
            return float(self.fold_share)
        return DEFAULT_FOLD_SHARE if self.uses_bias and self.ranks_logits else 0.0

    @property
    def uses_loss(self) -> bool:
        return self.uses_aux or self.z_loss_coef > 0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["capacity_factors"] = list(self.capacity_factors)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BalanceConfig:
        """Build from a mapping; an unknown key raises with a "did you mean" suggestion."""
        if not isinstance(data, Mapping):
            raise ValueError(f"moe_balance config must be a mapping of field names, got {type(data).__name__}")
        _check_keys(data)
        return cls(**dict(data))

    def replace(self, **changes: Any) -> BalanceConfig:
        return dataclasses.replace(self, **changes)


# Fields of earlier versions and what replaced them (a saved state may still name them: see without_retired).
RETIRED = {
    "bias_absorb_coef": "the online fold (fold_share) moves the bias into the router weights directly",
    "quantile_adaptive_step": "quantile_step='filtered' (the default) chooses the share of each price move from "
                              "how well it predicted the prices since",
    "handover_fraction": "the online fold (fold_share) keeps the weights carrying the routing at every step, "
                         "so nothing is handed over at the end",
}


def without_retired(data: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config without the fields of earlier versions (for states and fold records read back)."""
    return {k: v for k, v in data.items() if k not in RETIRED}


def _check_keys(data: Mapping[str, Any]) -> None:
    known = [f.name for f in dataclasses.fields(BalanceConfig)]
    for key in data:
        if key in RETIRED:
            raise ValueError(f"moe_balance config key {key!r} was removed: {RETIRED[key]}")
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown moe_balance config key {key!r}{hint} Known keys: {known}")


def read_deepspeed_entry(ds_config: Any, key: str = "moe_balance") -> Mapping[str, Any] | None:
    """The ``"moe_balance"`` entry of a DeepSpeed config given as a dict or a JSON file path (or None)."""
    if ds_config is None:
        return None
    if isinstance(ds_config, (str, os.PathLike)):
        ds_config = json.loads(Path(ds_config).read_text())
    return ds_config.get(key) if isinstance(ds_config, Mapping) else None


def resolve_config(config: BalanceConfig | Mapping[str, Any] | None = None, **overrides: Any) -> BalanceConfig:
    """Accept a config, a dict or keyword fields (not several that disagree)."""
    if config is None:
        return BalanceConfig.from_dict(overrides)
    base = config if isinstance(config, BalanceConfig) else BalanceConfig.from_dict(config)
    if overrides:
        _check_keys(overrides)
        return base.replace(**overrides)
    return base


__all__ = ["BalanceConfig", "resolve_config", "without_retired", "resolved_bias_space", "read_deepspeed_entry",
           "AUX_LOSSES",
           "BIAS_UPDATES", "BIAS_SPACES", "BIAS_SCHEDULES"]
