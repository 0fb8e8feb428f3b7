"""How much the backward is scaled, per engine: the one place that knows.

The balance loss rides on the router outputs through autograd (see ``patching.strategies.AttachLoss``),
so it never passes through the training loop's ``loss / accumulation * loss_scale``. Its gradient
must be multiplied by the same factors the engine applies to the language-model loss, or it is
``accumulation`` times too strong, or ``1 / loss_scale`` (1/65536 under fp16) too weak.

:class:`BackwardScale` holds both factors as callables read at every backward, so a dynamic loss
scale or a shorter last accumulation window is followed. :func:`precision_scale_of` knows where
each engine keeps its mixed-precision loss scale.

Example:
    >>> import torch
    >>> scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    >>> scale = BackwardScale(accumulation=lambda: 4, precision=precision_scale_of(scaler))
    >>> float(scale())
    256.0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

ScaleValue = float | torch.Tensor


class BackwardScale:
    """``precision() / accumulation()``: the factor on the attached balance-loss gradient."""

    def __init__(self, accumulation: Callable[[], int] | int = 1,
                 precision: Callable[[], ScaleValue] | None = None) -> None:
        self.accumulation = accumulation if callable(accumulation) else (lambda steps=accumulation: steps)
        self.precision = precision

    def __call__(self) -> ScaleValue:
        steps = max(1, int(self.accumulation()))
        if self.precision is None:
            return 1.0 / steps
        value = self.precision()
        return value / steps  # a tensor scale stays a tensor: no host sync in the backward


def _grad_scaler_scale(scaler: Any) -> Callable[[], ScaleValue] | None:
    """A ``torch.amp.GradScaler`` (or the older ``torch.cuda.amp`` one) that is enabled."""
    if not scaler.is_enabled():
        return None

    def read() -> ScaleValue:
        scale = scaler._scale  # the device tensor scale() multiplies by; created lazily at the first scale()
        return scale if scale is not None else float(scaler.get_scale())
    return read


def _deepspeed_optimizer_scale(optimizer: Any) -> Callable[[], ScaleValue] | None:
    """DeepSpeed's fp16 optimizers: ``FP16_Optimizer``/``FP16_UnfusedOptimizer`` and the ZeRO ones
    all expose ``loss_scale`` (``cur_scale`` only on some; None when grad scaling is off)."""
    if not (hasattr(optimizer, "loss_scale") or hasattr(optimizer, "cur_scale")):
        return None

    def read() -> float:
        value = getattr(optimizer, "loss_scale", None)
        if value is None:
            value = getattr(optimizer, "cur_scale", None)
        return 1.0 if value is None else float(value)
    return read


def precision_scale_of(obj: Any) -> Callable[[], ScaleValue] | None:
    """A callable giving the loss scale ``obj``'s backward runs at, or None when it does not scale.

    ``obj`` may be a ``torch.amp.GradScaler``, an ``accelerate.Accelerator``, a DeepSpeed engine, a
    DeepSpeed fp16/ZeRO optimizer, or an HF ``Trainer`` (through its accelerator). bf16 and fp32
    runs do not scale the loss.
    """
    if obj is None:
        return None
    if isinstance(obj, torch.amp.GradScaler) or type(obj).__name__ == "GradScaler":
        return _grad_scaler_scale(obj)
    accelerator = getattr(obj, "accelerator", None)  # HF Trainer
    if accelerator is not None and hasattr(accelerator, "gradient_accumulation_steps"):
        return precision_scale_of(accelerator)
    if hasattr(obj, "gradient_accumulation_steps") and hasattr(obj, "unwrap_model"):  # accelerate.Accelerator
        engine = getattr(getattr(obj, "deepspeed_engine_wrapped", None), "engine", None)
        if engine is not None:
            return precision_scale_of(engine)
        scaler = getattr(obj, "scaler", None)
        return _grad_scaler_scale(scaler) if scaler is not None else None
    if hasattr(obj, "fp16_enabled") and hasattr(obj, "was_step_applied"):  # DeepSpeed engine
        if not obj.fp16_enabled():
            return None
        return _deepspeed_optimizer_scale(obj.optimizer)
    return _deepspeed_optimizer_scale(obj)


def lazy_precision_scale(obj: Any) -> Callable[[], ScaleValue]:
    """Like :func:`precision_scale_of`, resolved at every call: engines are often built after the
    patch (the HF Trainer prepares DeepSpeed and its GradScaler inside ``train()``)."""
    def read() -> ScaleValue:
        scale = precision_scale_of(obj)
        return 1.0 if scale is None else scale()
    return read


__all__ = ["BackwardScale", "precision_scale_of", "lazy_precision_scale"]
