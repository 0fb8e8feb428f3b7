"""DeepSpeed integration: a ``"moe_balance"`` entry in the DeepSpeed config and one swapped call.

    {"train_batch_size": 16, "zero_optimization": {"stage": 2},
     "moe_balance": {"bias_update": "sign", "bias_update_rate": 0.001, "z_loss_coef": 0.001}}

    from moe_balance.integrations import deepspeed as mb_ds
    engine, optimizer, loader, scheduler = mb_ds.initialize(model=model, config=ds_config, ...)
    mb_ds.balancer(engine).metrics()

``initialize`` takes exactly what ``deepspeed.initialize`` takes and returns the same tuple. Before
the engine is built it validates the entry (a bad field fails here, named) and patches the model's
routers: transformers MoE routers and ``deepspeed.moe`` ``TopKGate`` gates (k = 1, 2 or more; the
bias changes the selection only, DeepSpeed's capacity and ``l_aux`` stay as they are). On the
engine it wraps:

* ``step``: at a gradient-accumulation boundary, and only if ``engine.was_step_applied()`` (fp16
  overflow skips change nothing), ``Balancer.step()`` runs: one all-reduce of the counts over the
  engine's data-parallel group (gates are replicated there, expert parallel or not; pipeline stages
  are not summed), bias update;
* ``save_checkpoint`` / ``load_checkpoint``: the balancer state travels in ``client_state``;
* metrics go to DeepSpeed's monitor (TensorBoard/CSV/W&B when configured) and to the log on rank 0
  every ``steps_per_print`` steps.

Without a ``"moe_balance"`` entry, ``initialize`` warns and behaves exactly like ``deepspeed.initialize``.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from moe_balance._optional import require
from moe_balance.balancer import Balancer
from moe_balance.config import BalanceConfig, read_deepspeed_entry
from moe_balance.patching import api as patching
from moe_balance.scaling import BackwardScale, lazy_precision_scale
from moe_balance.stats_log import prefixed

require("deepspeed")

logger = logging.getLogger("moe_balance")
ENTRY = "moe_balance"
CLIENT_STATE_KEY = "moe_balance"


def initialize(*args: Any, **kwargs: Any):
    """``deepspeed.initialize`` with moe_balance driven by the config's ``"moe_balance"`` entry."""
    import deepspeed
    bound = inspect.signature(deepspeed.initialize).bind(*args, **kwargs)
    params = bound.arguments
    config = params.get("config") or params.get("config_params")
    if config is None and getattr(params.get("args"), "deepspeed_config", None):
        config = params["args"].deepspeed_config
    config = _load_config(config)  # a JSON path is read once, for the entry and the scheduler
    entry = read_deepspeed_entry(config, ENTRY)
    if entry is None:
        warnings.warn("moe_balance: the DeepSpeed config has no \"moe_balance\" entry; nothing is balanced "
                      "(add e.g. \"moe_balance\": {\"bias_update\": \"sign\"})", UserWarning, stacklevel=2)
        return deepspeed.initialize(*args, **kwargs)
    cfg = BalanceConfig.from_dict(entry)
    model = params.get("model")
    if model is None:
        raise ValueError("moe_balance.integrations.deepspeed.initialize needs model=")
    balancer = patching.patch(model, cfg, attach_loss=True)
    result = deepspeed.initialize(*args, **kwargs)
    engine = result[0]
    attach_engine(engine, model, balancer)
    return result


def _load_config(config: Any) -> Any:
    """A DeepSpeed config given as a JSON file path, read; a dict (or None) as it is."""
    return json.loads(Path(config).read_text()) if isinstance(config, (str, os.PathLike)) else config


def data_parallel_group(engine: Any) -> Any:
    """The group the engine reduces the gates' gradients over: data parallel times sequence parallel
    (each sequence-parallel rank routes a slice of the tokens). None = WORLD when DeepSpeed has no other."""
    group = getattr(engine, "seq_data_parallel_group", None) or getattr(engine, "data_parallel_group", None)
    if group is None:
        from deepspeed.utils import groups
        try:
            group = groups._get_data_parallel_group()
        except (AssertionError, AttributeError, RuntimeError):
            group = None
    return group


def balancer(engine: Any) -> Balancer:
    """The Balancer driven by an engine from :func:`initialize`."""
    try:
        return engine.__dict__["_moe_balancer"]
    except KeyError:
        raise ValueError("this engine was not built by moe_balance.integrations.deepspeed.initialize") from None


def attach_engine(engine: Any, model: Any, bal: Balancer) -> None:
    """Wrap ``step``, ``save_checkpoint`` and ``load_checkpoint`` of this engine instance."""
    engine.__dict__["_moe_balancer"] = bal
    state = patching.patch_state_of(model)
    # engine.backward divides by the accumulation steps and multiplies by the fp16 optimizer's loss scale
    state.backward_scale = BackwardScale(engine.gradient_accumulation_steps, lazy_precision_scale(engine))
    # Gates are replicated over the data-parallel group; pipeline or tensor stages must not be summed.
    bal.reducer.group = data_parallel_group(engine)
    original_step = engine.step
    original_save = engine.save_checkpoint
    original_load = engine.load_checkpoint

    def step(*args: Any, **kwargs: Any):
        boundary = engine.is_gradient_accumulation_boundary()
        result = original_step(*args, **kwargs)
        if boundary:
            if engine.was_step_applied():
                bal.step()
                _report(engine, bal)
            else:
                bal.reset_window()
        return result

    def save_checkpoint(save_dir: Any, tag: Any = None, client_state: Mapping[str, Any] | None = None,
                        *args: Any, **kwargs: Any):
        client_state = dict(client_state or {})
        client_state[CLIENT_STATE_KEY] = bal.state_dict()
        return original_save(save_dir, tag, client_state, *args, **kwargs)

    def load_checkpoint(*args: Any, **kwargs: Any):
        load_path, client_state = original_load(*args, **kwargs)
        if client_state and CLIENT_STATE_KEY in client_state:
            bal.load_state_dict(client_state.pop(CLIENT_STATE_KEY))
        elif load_path is not None:
            logger.warning("moe_balance: checkpoint %s holds no balancer state; it starts fresh", load_path)
        return load_path, client_state

    engine.step = step
    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint


def _report(engine: Any, bal: Balancer) -> None:
    every = max(1, int(engine.steps_per_print() or 1))
    if bal.num_steps % every:
        return
    metrics = prefixed(bal.metrics())
    monitor = getattr(engine, "monitor", None)
    if monitor is not None and getattr(monitor, "enabled", False) and engine.global_rank == 0:
        monitor.write_events([(name, value, engine.global_samples) for name, value in metrics.items()])
    if engine.global_rank == 0:
        logger.info("moe_balance step %d: %s", bal.num_steps,
                    ", ".join(f"{k.split('/', 1)[1]}={v:.4g}" for k, v in metrics.items()
                              if k.endswith(("maxvio_global", "maxvio_batch", "capacity_dropped", "bias_abs_max"))))
