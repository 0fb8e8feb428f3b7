"""PyTorch Lightning integration: ``MoEBalanceCallback``, one callback added to ``Trainer(callbacks=[...])``.

What it does, and where in Lightning:

* ``setup`` (every rank, process group already up): finds the transformers MoE model inside the
  ``LightningModule`` (the one child module with routers ``moe_balance.find_routers`` can patch, the module
  itself, or ``model_attr="path.to.model"``) and patches its routers with ``attach_loss=True``; a model built
  in ``configure_model`` is patched at ``on_fit_start`` instead;
* the attached balance loss is scaled like Lightning scales the training loss: ``1 / accumulate_grad_batches``
  times the GradScaler's loss scale under ``16-mixed`` (read from the precision plugin at every backward);
* ``on_before_optimizer_step`` marks a real optimizer step (not called on accumulating micro-batches) and
  notes the loss scale; ``on_train_batch_end`` then runs ``balancer.step()`` (one all-reduce over the DDP
  ranks, bias update), or only resets the window when the GradScaler skipped the step (its scale dropped);
* ``moe_balance/*`` metrics go through ``pl_module.log_dict`` after every applied step (the Trainer's
  ``log_every_n_steps`` and loggers decide what is written; the values are already summed over ranks);
  validation and test measure balance without touching the bias (``val_moe_balance/*``, ``test_moe_balance/*``);
* the load heatmap and MaxVio curve go to TensorBoard / W&B loggers as images every ``heatmap_every``-th
  logging step on rank 0 (:class:`moe_balance.plot.BalanceImages`);
* checkpoints: ``state_dict``/``load_state_dict`` of the callback carry the balancer state (tensors and plain
  types only) in Lightning's checkpoint, so ``trainer.fit(ckpt_path=...)`` resumes exactly.

Example:
    >>> from moe_balance.integrations.lightning import MoEBalanceCallback
    >>> cb = MoEBalanceCallback(bias_update="sign", bias_update_rate=1e-3, aux_loss="global_batch")
    >>> cb.config.bias_update, cb.state_key
    ('sign', 'MoEBalanceCallback')

    Then ``lightning.Trainer(callbacks=[cb], accumulate_grad_batches=4, ...).fit(module, loader)``.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any
from collections.abc import Callable, Mapping

import torch

from moe_balance._optional import require
from moe_balance.balancer import Balancer
from moe_balance.config import BalanceConfig, resolve_config
from moe_balance.patching import api as patching
from moe_balance.plot import BalanceImages
from moe_balance.scaling import BackwardScale, ScaleValue, precision_scale_of
from moe_balance.stats_log import prefixed

try:  # the unified package first, then the standalone one
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    pl = require("pytorch_lightning")

logger = logging.getLogger("moe_balance")
_EVAL_KEYS = ("maxvio_global", "maxvio_batch", "cv", "dead_experts", "load_entropy")


def find_moe_model(pl_module: torch.nn.Module, model_attr: str | None = None) -> torch.nn.Module | None:
    """The module to patch inside a LightningModule: ``model_attr`` (dotted path) if given, else the one
    direct child with patchable routers, else the module itself if it has some; None when none has any.

    Example:
        >>> import torch
        >>> find_moe_model(torch.nn.Linear(2, 2)) is None
        True
    """
    if model_attr is not None:
        module: Any = pl_module
        for part in model_attr.split("."):
            module = getattr(module, part)
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"moe_balance: {model_attr!r} of {type(pl_module).__name__} is not an nn.Module")
        return module

    def patchable(module: torch.nn.Module) -> bool:
        return any(r["strategy"] is not None for r in patching.find_routers(module))

    found = [(name, child) for name, child in pl_module.named_children() if patchable(child)]
    if len(found) > 1:
        raise ValueError(f"moe_balance: several children of {type(pl_module).__name__} have MoE routers "
                         f"({', '.join(n for n, _ in found)}); pass MoEBalanceCallback(model_attr=...)")
    if found:
        return found[0][1]
    return pl_module if patchable(pl_module) else None


def _precision_of(trainer: Any) -> Callable[[], ScaleValue]:
    """The loss scale of the trainer's precision plugin, read at every backward (1 without a GradScaler)."""
    def read() -> ScaleValue:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = precision_scale_of(scaler) if scaler is not None else None
        return 1.0 if scale is None else scale()
    return read


class MoEBalanceCallback(pl.Callback):
    """Balance the routers of the LightningModule's MoE model: losses, loss-free bias, metrics, checkpoints.

    Args:
        config: a :class:`~moe_balance.BalanceConfig` (or dict); or give its fields as keywords.
        model_attr: dotted attribute path of the transformers model inside the LightningModule
            (default: found automatically).
        heatmap_every: send the load heatmap and MaxVio curve to TensorBoard/W&B loggers every this many
            logging steps (``Trainer(log_every_n_steps=...)``); 0 turns it off.
        ship: at the end of ``fit``, fold the bias the generic routers still apply into their weights
            (``moe_balance.export``), so the saved model routes in stock transformers / vLLM as trained; the
            top-k agreement goes to the loggers as ``moe_balance/export_topk_agreement``.
        ship_batches: training batches used for that fold (half fit it, half measure the agreement).
        **fields: ``BalanceConfig`` fields.

    Tested on CPU with Lightning 2.6: one process, ``accumulate_grad_batches``, 2-rank ``strategy="ddp"``
    (gloo, torchrun), ``16-mixed`` skipped steps, ``ckpt_path=`` resume.
    """

    def __init__(self, config: BalanceConfig | Mapping[str, Any] | None = None, *, model_attr: str | None = None,
                 heatmap_every: int = 10, ship: bool = True, ship_batches: int = 8, **fields: Any) -> None:
        self.config = resolve_config(config, **fields)  # validate now: errors at construction
        self.ship, self.ship_batches = ship, ship_batches
        self.export_agreement: float | None = None
        self.model_attr = model_attr
        self.images = BalanceImages(heatmap_every)
        self.balancer: Balancer | None = None
        self.model: torch.nn.Module | None = None
        self._pending_state: Mapping[str, Any] | None = None
        self._stepping = False
        self._scale_before: float | None = None
        self._measuring = ExitStack()

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._patch(trainer, pl_module, required=not _overrides_configure_model(pl_module))

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._patch(trainer, pl_module, required=True)

    def _patch(self, trainer: Any, pl_module: Any, required: bool) -> None:
        if self.balancer is not None:
            return
        model = find_moe_model(pl_module, self.model_attr)
        if model is None:
            if required:
                raise ValueError(f"moe_balance: no MoE routers found in {type(pl_module).__name__} or its children; "
                                 "pass MoEBalanceCallback(model_attr=...) or register the router class")
            return  # built in configure_model: patched at on_fit_start
        existing = patching.patch_state_of(model)
        if existing is not None and existing.balancer.config != self.config:
            raise ValueError("moe_balance: the model is already patched with another config; call "
                             "moe_balance.unpatch(model) first or give the callback the same config")
        self.balancer = patching.patch(model, self.config, attach_loss=True)
        state = patching.patch_state_of(model)
        state.attach_loss = True
        # Lightning divides the training loss by accumulate_grad_batches and multiplies it by the GradScaler's
        # scale (16-mixed) before backward; the attached balance loss gets the same factors.
        state.backward_scale = BackwardScale(lambda: trainer.accumulate_grad_batches, _precision_of(trainer))
        self.model = model
        if self._pending_state is not None:
            self.balancer.load_state_dict(self._pending_state)
            self._pending_state = None

    # -------------------------------------------------------------- training
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.ship or self.balancer is None:
            return
        from moe_balance import export
        # Lazy: the dataloader is only read when a fold is due (CombinedLoader yields (batch, idx, loader_idx)).
        batches = (b[0] if isinstance(b, tuple) and len(b) == 3 else b for b in trainer.train_dataloader or [])
        shipped = export.ship(self.model, batches, limit=self.ship_batches)
        self.export_agreement = shipped["topk_agreement"]
        for lg in trainer.loggers if trainer.is_global_zero else []:
            lg.log_metrics({f"moe_balance/export_{key}": value for key, value in shipped.items()},
                           step=trainer.global_step)

    def _scaler(self, trainer: Any) -> Any:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._stepping = True  # only called for a real step: not on accumulating micro-batches
        scaler = self._scaler(trainer)
        self._scale_before = float(scaler.get_scale()) if scaler is not None else None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._stepping:
            return  # accumulating: keep counting
        self._stepping = False
        scaler = self._scaler(trainer)
        if scaler is not None and self._scale_before is not None and float(scaler.get_scale()) < self._scale_before:
            self.balancer.reset_window()  # the GradScaler found inf/nan and skipped optimizer.step()
            return
        self.balancer.step()
        metrics = self.balancer.metrics()
        keep = metrics if self.config.log_per_layer else {k: v for k, v in metrics.items() if "/" not in k}
        pl_module.log_dict(prefixed(keep), on_step=True, on_epoch=False, batch_size=1)
        every = max(1, int(trainer.log_every_n_steps))
        if trainer.is_global_zero and self.balancer.num_steps % every == 0:
            targets = [getattr(lg, "experiment", None) for lg in trainer.loggers]
            self.images.log(trainer.global_step, self.balancer, [t for t in targets if t is not None],
                            maxvio=metrics["maxvio_global"])

    # ------------------------------------------------------------ evaluation
    def _start_measuring(self) -> None:
        if self.balancer is not None:
            self._measuring.close()
            self._measuring.enter_context(self.balancer.measuring())

    def _stop_measuring(self, pl_module: Any, prefix: str, log: bool) -> None:
        if self.balancer is None:
            return
        self._measuring.close()  # reduces the evaluation window (all ranks), bias untouched
        if log:
            metrics = self.balancer.metrics(per_layer=False)
            pl_module.log_dict({f"{prefix}_moe_balance/{k}": metrics[k] for k in _EVAL_KEYS},
                               on_step=False, on_epoch=True, batch_size=1)

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._start_measuring()

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._stop_measuring(pl_module, "val", log=not trainer.sanity_checking)

    def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._start_measuring()

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._stop_measuring(pl_module, "test", log=True)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The balancer state (tensors and plain types) for Lightning's checkpoint."""
        if self.balancer is None:
            return {}
        state = {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
                 for k, v in self.balancer.state_dict().items()}
        return {"balancer": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("balancer")
        if saved is None:
            logger.warning("moe_balance: the checkpoint holds no balancer state; the balancer starts fresh")
            return
        if self.balancer is None:
            self._pending_state = saved  # model built in configure_model: applied once patched
        else:
            self.balancer.load_state_dict(saved)

    def unpatch(self, **kwargs: Any) -> None:
        """Restore the model's original routers (see :func:`moe_balance.unpatch`)."""
        if self.model is not None:
            patching.unpatch(self.model, **kwargs)
            self.model, self.balancer = None, None


def _overrides_configure_model(pl_module: Any) -> bool:
    hook = getattr(type(pl_module), "configure_model", None)
    base = getattr(pl.LightningModule, "configure_model", None)
    return hook is not None and hook is not base


__all__ = ["MoEBalanceCallback", "find_moe_model"]
