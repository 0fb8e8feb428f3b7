"""Accelerate integration: one line after ``accelerator.prepare``.

Example (the loop stays as it is)::

    from moe_balance.integrations.accelerate import attach
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    balancer = attach(accelerator, model, optimizer, bias_update="sign", aux_loss="global_batch")
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)      # balance-loss gradients ride on the router outputs
            optimizer.step(); optimizer.zero_grad()

What ``attach`` does: unwraps and patches the model's routers; scales the attached balance loss by
``1 / gradient_accumulation_steps`` and by the fp16 loss scale, as ``accelerator.backward`` does;
wraps the prepared optimizer's ``step`` so the balancer steps (one all-reduce, bias update) only
when ``accelerator.sync_gradients`` and not ``optimizer.step_was_skipped``; saves ``moe_balance.pt``
with ``save_state``/``load_state`` (nothing unpickled); and sends ``moe_balance/*`` metrics to
``accelerator.log`` every ``log_every`` steps when trackers are set up.

The step's all-reduce sums the counts over the ranks that route different tokens: with a
``ParallelismConfig`` (FSDP2, HSDP, context parallel) that is the accelerator's ``dp_cp`` mesh group
(data-parallel replicate x shard x context parallel), not tensor-parallel ranks, which see the same tokens;
without a mesh, WORLD. With a device mesh of your own (plain ``fully_shard``), pass its group to
``moe_balance.patch(model, process_group=mesh.get_group("dp"))`` (flatten several data/context dimensions
first: ``mesh["dp", "cp"]._flatten("dp_cp").get_group()``).
"""

from __future__ import annotations

import sys
from typing import Any
from collections.abc import Mapping

from moe_balance._optional import require
from moe_balance.balancer import Balancer
from moe_balance.config import BalanceConfig, resolve_config
from moe_balance.patching import api as patching
from moe_balance.plot import BalanceImages
from moe_balance.scaling import BackwardScale, lazy_precision_scale
from moe_balance.stats_log import prefixed

require("accelerate")


def attach(accelerator: Any, model: Any, optimizer: Any, config: BalanceConfig | Mapping[str, Any] | None = None, *,
           attach_loss: bool = True, log_every: int = 10, heatmap_every: int = 10,
           **fields: Any) -> Balancer:
    """Patch ``model``'s routers and drive the balancer from the prepared ``optimizer``.

    Args:
        accelerator: the ``Accelerator`` that prepared ``model`` and ``optimizer``.
        attach_loss: False leaves the balance loss to you: add ``balancer.loss()`` to your loss
            (``accelerator.backward`` then scales it for accumulation like the rest).
        log_every: optimizer steps between ``accelerator.log`` calls (when trackers exist).
        heatmap_every: every this many ``accelerator.log`` calls, send the load heatmap and MaxVio curve as
            images to the tensorboard / wandb trackers (main process); 0 turns it off.
        **fields: :class:`~moe_balance.BalanceConfig` fields.
    """
    from accelerate.optimizer import AcceleratedOptimizer
    cfg = resolve_config(config, **fields)
    if not isinstance(optimizer, AcceleratedOptimizer):
        raise ValueError("attach() needs the optimizer returned by accelerator.prepare(...): call it after prepare")
    unwrapped = accelerator.unwrap_model(model)
    if not any(accelerator.unwrap_model(m) is unwrapped for m in accelerator._models):
        raise ValueError("attach() needs the model returned by accelerator.prepare(...): call it after prepare")
    group = data_parallel_group(accelerator)
    balancer = patching.patch(unwrapped, cfg, attach_loss=attach_loss, process_group=group)
    if group is not None:  # also when the model was patched before, with the default (WORLD)
        balancer.reducer.group = group
    # accelerator.backward divides by the accumulation steps and multiplies by its GradScaler's (or the
    # DeepSpeed engine's) loss scale; the attached loss gets the same factors.
    patching.patch_state_of(unwrapped).backward_scale = BackwardScale(
        lambda: accelerator.gradient_accumulation_steps, lazy_precision_scale(accelerator))
    _wrap_step(accelerator, optimizer, balancer, log_every, BalanceImages(heatmap_every))
    _checkpoint_with(accelerator, balancer)
    return balancer


STATE_FILE = "moe_balance.pt"


def _checkpoint_with(accelerator: Any, balancer: Balancer) -> None:
    """``save_state``/``load_state`` carry ``moe_balance.pt`` through accelerate's public state hooks.

    Not ``register_for_checkpointing``: accelerate loads those objects with ``weights_only=False``, and a
    checkpoint folder is shared and downloaded; ``Balancer.load`` unpickles nothing. The load hook runs on
    every rank (a ZeRO-3 partitioned native bias is written collectively).
    """
    from pathlib import Path

    def save(models: Any, weights: Any, output_dir: str) -> None:
        if accelerator.is_main_process:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            balancer.save(Path(output_dir) / STATE_FILE)

    def load(models: Any, input_dir: str) -> None:
        path = Path(input_dir) / STATE_FILE
        if path.exists():
            balancer.load(path)
        else:
            import warnings
            warnings.warn(f"moe_balance: {input_dir} holds no {STATE_FILE}; the balancer continues as it is",
                          RuntimeWarning, stacklevel=2)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def data_parallel_group(accelerator: Any) -> Any:
    """The process group whose ranks route different tokens: the accelerator's device mesh flattened over
    data-parallel replicate/shard and context-parallel dimensions (``dp_cp``). None (WORLD) without a mesh,
    or when no such dimension is larger than 1 (every rank then routes the same tokens: summing them over
    WORLD multiplies all counts alike, so only the ``tokens`` metric grows)."""
    mesh = getattr(accelerator, "torch_device_mesh", None)
    config = getattr(accelerator, "parallelism_config", None)
    if mesh is None or config is None or not config.dp_cp_dim_names:
        return None
    return mesh["dp_cp"].get_group()


def _called_by_checkpoint_init(depth: int = 6) -> bool:
    """True when torch.distributed.checkpoint's ``_init_optim_state`` runs the optimizer step: its
    ``get/set_optimizer_state_dict`` (accelerate's FSDP ``save_state``/``load_state``) fill an empty
    optimizer state with one step at lr 0 on zero gradients. Looked up the stack (an LR scheduler may
    wrap ``step`` again); lr 0 alone would not tell it from a warmup's first real step."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_name == "_init_optim_state" and \
                frame.f_globals.get("__name__", "").startswith("torch.distributed.checkpoint"):
            return True
        frame = frame.f_back
    return False


def _wrap_step(accelerator: Any, optimizer: Any, balancer: Balancer, log_every: int, images: BalanceImages) -> None:
    if getattr(optimizer, "_moe_balance_wrapped", False):
        raise ValueError("this optimizer already drives a moe_balance Balancer")
    original_step = optimizer.step

    def step(*args: Any, **kwargs: Any):
        result = original_step(*args, **kwargs)
        if _called_by_checkpoint_init():
            return result  # no training step: nothing was routed, the window must stay open
        if not accelerator.sync_gradients:
            return result  # inside accumulate(): no real step yet, keep counting
        if optimizer.step_was_skipped:
            balancer.reset_window()  # e.g. fp16 overflow: nothing was applied
            return result
        balancer.step()
        if accelerator.trackers and log_every and balancer.num_steps % log_every == 0:
            metrics = balancer.metrics()
            accelerator.log(prefixed(metrics), step=balancer.num_steps)
            if images.every and accelerator.is_main_process:
                images.log(balancer.num_steps, balancer, [getattr(t, "tracker", None) for t in accelerator.trackers],
                           maxvio=metrics["maxvio_global"])
        return result

    optimizer.step = step
    optimizer._moe_balance_wrapped = True
