"""HF Trainer integration: ``MoEBalanceCallback``, one line added to an existing script.

What it does, and where in the Trainer:

* ``on_init_end`` (inside ``Trainer.__init__``): validates the config and patches the model's routers,
  so an unsupported model or a bad config fails at ``Trainer(...)``, not hours in;
* the callback owns balancing for the whole run: the model's own pooled aux loss (``output_router_logits``,
  and a TRL trainer's ``aux_loss_enabled``, which TRL sets after ``on_init_end``) is switched off there,
  again in ``on_train_begin`` and before every step, with one warning; ``keep_model_aux_loss=True`` keeps
  it. An explicit non-zero ``router_aux_loss_coef`` in a TRL config fails at ``Trainer(...)`` unless kept;
* the balance loss rides on the router outputs (``attach_loss``), so ``compute_loss`` (and any
  subclass's) stays untouched;
* ``on_step_end`` (after each optimizer step): ``balancer.step()`` (one all-reduce, bias update),
  or only a window reset when the optimizer skipped the step;
* ``Trainer.log`` and ``Trainer.evaluation_loop`` are wrapped on this trainer instance so balance
  metrics land in ``state.log_history``, the console and every reporter under ``moe_balance/``;
  evaluation measures balance without touching the bias;
* the attached loss is scaled like the Trainer scales its own: ``1 / current_gradient_accumulation_steps``
  (shorter last window included) times the fp16 loss scale of the GradScaler or DeepSpeed optimizer;
* checkpoints: the balancer state in ``trainer_state.json`` (restored on every resume path: plain,
  DeepSpeed, FSDP, and with ``restore_callback_states_from_checkpoint=True``) and ``moe_balance.pt``.

Example:
    >>> from moe_balance.integrations.hf import MoEBalanceCallback
    >>> cb = MoEBalanceCallback(bias_update="sign", aux_loss="global_batch", aux_loss_coef=1e-3)
    >>> cb.config.aux_loss
    'global_batch'
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import warnings
import weakref
from pathlib import Path
from typing import Any
from collections.abc import Callable, Mapping

import torch

from moe_balance._optional import require
from moe_balance.balancer import Balancer
from moe_balance.config import BalanceConfig, read_deepspeed_entry, resolve_config
from moe_balance.patching import api as patching
from moe_balance.patching.strategies import is_sharded
from moe_balance.plot import BalanceImages
from moe_balance.scaling import BackwardScale, lazy_precision_scale
from moe_balance.stats_log import StatsWriter, prefixed

require("transformers")
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import ExportableState  # noqa: E402

logger = logging.getLogger("moe_balance")
STATE_FILE = "moe_balance.pt"
STATS_FILE = "moe_balance_stats.jsonl"


def merge_config(explicit: Mapping[str, Any], entry: Mapping[str, Any] | None) -> BalanceConfig:
    """Explicit fields and a config-file entry may both be given, but must not disagree."""
    if entry is None:
        return resolve_config(None, **explicit)
    from_entry = BalanceConfig.from_dict(entry)
    clashes = {k: (v, entry[k]) for k, v in explicit.items() if k in entry and entry[k] != v}
    if clashes:
        detail = ", ".join(f"{k}: argument {a!r} vs config {b!r}" for k, (a, b) in clashes.items())
        raise ValueError(f"moe_balance settings disagree between MoEBalanceCallback and the DeepSpeed "
                         f"config's \"moe_balance\" entry ({detail}); keep one of them")
    return from_entry.replace(**explicit)


def checkpoint_keys(folder: str | os.PathLike) -> set[str] | None:
    """Tensor names stored in a checkpoint folder's safetensors files (None if there are none)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    single = folder / "model.safetensors"
    if not single.exists():
        return None
    from safetensors import safe_open
    with safe_open(str(single), framework="pt") as f:
        return set(f.keys())


def _is_sharded(model: torch.nn.Module) -> bool:
    """FSDP2/DTensor or DeepSpeed ZeRO-3 parameters: the engine restored them from its own checkpoint."""
    return any(is_sharded(param) for param in model.parameters())


@torch.no_grad()
def repair_converted_weights(model: torch.nn.Module, folder: str | os.PathLike) -> bool:
    """If the checkpoint's names differ from the model's (weights converted on save, not mapped back
    by ``Trainer._load_from_checkpoint``), load them through ``from_pretrained``'s conversion.

    Sharded models are left alone: their engine restored them from its own checkpoint, and full
    tensors cannot be copied into shards.
    """
    keys = checkpoint_keys(folder)
    if keys is None or not hasattr(model, "save_pretrained") or _is_sharded(model):
        return False
    wanted = set(model.state_dict())
    if wanted <= keys:
        return False
    logger.warning("moe_balance: %d weights of %s were not restored by the Trainer (converted names such as "
                   "per-expert keys); reloading them with from_pretrained", len(wanted - keys), folder)
    fresh = type(model).from_pretrained(folder, dtype=next(model.parameters()).dtype)
    fresh_state = fresh.state_dict()
    for name, tensor in model.state_dict().items():
        tensor.copy_(fresh_state[name].to(tensor.device))
    return True


def _find_trainer() -> Any | None:
    """The Trainer whose method is calling us (callbacks are not handed the trainer)."""
    from transformers import Trainer
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


def _accumulation_of(trainer: Any, args: Any) -> Callable[[], int]:
    """The Trainer divides each micro-batch loss by the size of *this* accumulation window, which is
    shorter at the end of an epoch (``current_gradient_accumulation_steps``)."""
    def steps() -> int:
        current = getattr(trainer, "current_gradient_accumulation_steps", None) if trainer is not None else None
        return int(current or args.gradient_accumulation_steps)
    return steps


class MoEBalanceCallback(TrainerCallback, ExportableState):
    """Balance the routers of the Trainer's MoE model: losses, loss-free bias, metrics, checkpoints.

    Args:
        config: a :class:`~moe_balance.BalanceConfig` (or dict); or give its fields as keywords.
        repair_resume: on ``resume_from_checkpoint``, reload weights whose checkpoint keys the Trainer
            could not map back (fused MoE experts saved per expert; transformers issue #48805).
        write_stats: append metrics (and the load matrix) to ``output_dir/moe_balance_stats.jsonl``
            on the main process at every log, for ``python -m moe_balance plot``.
        heatmap_every: every this many logging steps, send the ``[layers, experts]`` load heatmap and the
            MaxVio curve as images to the TensorBoard / W&B reporters (``report_to``); 0 turns it off.
        keep_model_aux_loss: keep the model's own pooled router aux loss (transformers' ``output_router_logits``,
            TRL's ``router_aux_loss_coef``) beside this callback's balancing. Off by default: the callback
            switches it off for the whole run (whichever trainer turns it back on) and warns once.
        ship: at the end of training, fold the bias the generic routers still apply into their weights (see
            ``moe_balance.export``) so that ``trainer.save_model()`` writes a model that routes, in stock
            transformers or vLLM, as it did in training; logs ``moe_balance/export_topk_agreement``.
        ship_batches: training batches used for that fold (half fit it, half measure the agreement).
        **fields: ``BalanceConfig`` fields. A ``"moe_balance"`` entry in ``args.deepspeed`` is read too.

    Resume works on every path the Trainer takes (plain, DeepSpeed, FSDP): the balancer state travels
    in ``trainer_state.json`` (``ExportableState``), which the Trainer reads before ``on_train_begin``
    whichever engine restores the weights; ``moe_balance.pt`` beside it is the same state for tools.
    """

    def __init__(self, config: BalanceConfig | Mapping[str, Any] | None = None, *, write_stats: bool = True,
                 repair_resume: bool = True, heatmap_every: int = 10, keep_model_aux_loss: bool = False,
                 ship: bool = True, ship_batches: int = 8, **fields: Any) -> None:
        if not isinstance(keep_model_aux_loss, bool):
            raise ValueError(f"MoEBalanceCallback keep_model_aux_loss={keep_model_aux_loss!r} must be True or False")
        explicit = dict(config.to_dict() if isinstance(config, BalanceConfig) else (config or {}))
        explicit.update(fields)
        self._explicit = explicit
        self.config = resolve_config(None, **explicit)  # validate now: errors at construction
        self.write_stats = write_stats
        self.repair_resume = repair_resume
        self.heatmap_every = heatmap_every
        self.keep_model_aux_loss = keep_model_aux_loss
        self.ship, self.ship_batches = ship, ship_batches
        self.export: dict[str, float] = {}  # what ship() measured at on_train_end
        self.trained_bias_LE: torch.Tensor | None = None
        self._warned_model_aux = False
        self._images = BalanceImages(heatmap_every)
        self.balancer: Balancer | None = None
        self.restored_state: Mapping[str, Any] | None = None  # set by the Trainer's callback-state restore
        self._trainer_ref: Any = None
        self._stats: StatsWriter | None = None

    # ------------------------------------------------------------------ setup
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self.config = merge_config(self._explicit, read_deepspeed_entry(getattr(args, "deepspeed", None)))
        if model is None:
            raise ValueError("MoEBalanceCallback needs the Trainer's model")
        trainer = _find_trainer()
        _check_trl_coef(args, trainer, self.keep_model_aux_loss)
        existing = patching.patch_state_of(model)
        if existing is not None and existing.balancer.config != self.config:
            raise ValueError("moe_balance: the Trainer's model is already patched with another config; call "
                             "moe_balance.unpatch(model) first or give the callback the same config")
        if existing is not None:  # e.g. the same model handed to a second Trainer: keep its patch and state
            logger.info("moe_balance: the model was already patched with this config; the callback drives it")
        # The model's own aux loss is this callback's business (one warning, below), not patch()'s.
        configs = _router_configs(model)
        before = [getattr(c, "output_router_logits", None) for c in configs]
        for c in configs:
            c.output_router_logits = False
        try:
            self.balancer = patching.patch(model, self.config, attach_loss=True)
        finally:
            for c, value in zip(configs, before):
                c.output_router_logits = value
        patch_state = patching.patch_state_of(model)
        patch_state.attach_loss = True
        if configs and existing is None:  # unpatch() gives back what the model had
            patch_state.saved_output_router_logits = before[0]
        self._own_balancing(trainer, model, args)
        self._connect(trainer, model, args)
        if trainer is None:
            logger.warning("moe_balance: Trainer not found from the callback; metrics go to log_history only")
        return control

    def _connect(self, trainer: Any, model: torch.nn.Module, args: Any) -> None:
        """Point the patch's backward scale and the trainer's wrappers at this callback."""
        patch_state = patching.patch_state_of(model)
        patch_state.backward_scale = BackwardScale(_accumulation_of(trainer, args),
                                                   lazy_precision_scale(trainer) if trainer is not None else None)
        if trainer is not None:
            self._trainer_ref = weakref.ref(trainer)
            trainer._moe_balance_callback = self  # the wrappers follow a callback rebuilt on resume
            self._wrap_trainer(trainer)

    def _wrap_trainer(self, trainer: Any) -> None:
        """Instance-level wrappers (the class and other trainers are untouched)."""
        if getattr(trainer, "_moe_balance_wrapped", False):
            return
        trainer._moe_balance_wrapped = True
        original_log = trainer.log
        original_eval_loop = trainer.evaluation_loop
        original_load = trainer._load_from_checkpoint
        original_save_model = trainer.save_model

        def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "loss" in logs and trainer.is_world_process_zero():
                logs.update(trainer._moe_balance_callback.train_metrics())
            return original_log(logs, *args, **kwargs)

        def evaluation_loop(*args: Any, **kwargs: Any):
            balancer = trainer._moe_balance_callback.balancer
            with balancer.measuring():
                output = original_eval_loop(*args, **kwargs)
            prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
            metrics = balancer.metrics()
            for key in ("maxvio_global", "maxvio_batch", "cv", "dead_experts", "load_entropy"):
                output.metrics[f"{prefix}_moe_balance/{key}"] = metrics[key]
            return output

        def load_from_checkpoint(resume_from_checkpoint: str, *args: Any, **kwargs: Any):
            # Only the weight repair lives here; the balancer state comes back in on_train_begin.
            result = original_load(resume_from_checkpoint, *args, **kwargs)
            if trainer._moe_balance_callback.repair_resume:
                repair_converted_weights(trainer.model, resume_from_checkpoint)
            return result

        def save_model(output_dir: str | None = None, *args: Any, **kwargs: Any):
            # What was folded at the end of training goes beside the weights (check-export rebuilds the
            # trained model from it); stock loaders ignore the file.
            result = original_save_model(output_dir, *args, **kwargs)
            if trainer.is_world_process_zero():
                from moe_balance.export import write_fold_record
                write_fold_record(trainer.model, output_dir or trainer.args.output_dir)
            return result

        trainer.log = log
        trainer.save_model = save_model
        trainer.evaluation_loop = evaluation_loop
        trainer._load_from_checkpoint = load_from_checkpoint

    # -------------------------------------------------------------- training
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.balancer is None:  # rebuilt by restore_callback_states_from_checkpoint=True: adopt the patch
            self._adopt(args, model)
        trainer = self._trainer_ref() if self._trainer_ref else None
        # TRL's trainers write output_router_logits / aux_loss_enabled after on_init_end: switch off again
        self._own_balancing(trainer, model if model is not None else getattr(trainer, "model", None), args)
        engine = getattr(trainer, "deepspeed", None) if trainer is not None else None
        if engine is not None:  # built by train() just before: sum over its data-parallel group, not WORLD
            from .deepspeed import data_parallel_group
            self.balancer.reducer.group = data_parallel_group(engine)
        elif trainer is not None:  # FSDP2, TP, CP through a parallelism config: the mesh's data x context group
            from .accelerate import data_parallel_group as mesh_data_parallel_group
            group = mesh_data_parallel_group(trainer.accelerator)
            if group is not None:
                self.balancer.reducer.group = group
        if self.write_stats and state.is_world_process_zero:
            self._stats = StatsWriter(Path(args.output_dir) / STATS_FILE)
        if state.global_step > 0:  # resumed: the checkpoint's trainer_state.json is loaded by now
            saved = self.restored_state or self._saved_state(state)
            if saved:
                self.balancer.load_state_dict(_from_json(saved))
            else:
                logger.warning("moe_balance: resumed at step %d but the checkpoint holds no balancer state; "
                               "the balancer starts fresh", state.global_step)
            self.restored_state = None
        return control

    def _adopt(self, args: Any, model: torch.nn.Module | None) -> None:
        trainer = _find_trainer()
        model = model if model is not None else getattr(trainer, "model", None)
        patch_state = patching.patch_state_of(model) if model is not None else None
        if patch_state is None:
            raise RuntimeError("moe_balance: MoEBalanceCallback was created after Trainer.__init__ and the model "
                               "is not patched; pass the callback to Trainer(callbacks=[...])")
        self.config = patch_state.balancer.config
        self.balancer = patch_state.balancer
        self._connect(trainer, model, args)

    def _saved_state(self, state: Any) -> Mapping[str, Any] | None:
        saved = state.stateful_callbacks.get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        return (saved or {}).get("attributes", {}).get("restored_state")

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        trainer = self._trainer_ref() if self._trainer_ref else None
        self._own_balancing(trainer, model if model is not None else getattr(trainer, "model", None), args)
        return control

    def _own_balancing(self, trainer: Any, model: torch.nn.Module | None, args: Any) -> None:
        """Switch the model's own pooled aux loss off (config and TRL trainer flag); warn once.

        Plain attribute reads and writes: no host sync, cheap enough for every step."""
        if self.keep_model_aux_loss:
            return
        switched = []
        for config in _router_configs(model):
            if getattr(config, "output_router_logits", False):
                config.output_router_logits = False
                switched.append(f"{type(config).__name__}.output_router_logits")
        if trainer is not None and getattr(trainer, "aux_loss_enabled", False):
            trainer.aux_loss_enabled = False  # TRL SFT/GRPO/RLOO/DPO/KTO: no output_router_logits, no aux term
            switched.append(f"{type(trainer).__name__}.aux_loss_enabled")
        elif not hasattr(trainer, "aux_loss_enabled") and _trl_will_enable(args, model):
            # SFT/DPO set aux_loss_enabled after on_init_end: say so at construction, switch off at train begin
            switched.append(f"the aux loss TRL enables from the model's router_aux_loss_coef "
                            f"({type(args).__name__}.router_aux_loss_coef=None)")
        if switched and not self._warned_model_aux:
            self._warned_model_aux = True
            warnings.warn(
                "moe_balance: MoEBalanceCallback owns load balancing for this run, so the model's own pooled "
                f"router aux loss is switched off ({', '.join(dict.fromkeys(switched))}); its config "
                f"aux_loss={self.config.aux_loss!r}, bias_update={self.config.bias_update!r} balances each layer. "
                "To keep the model's loss as well, pass MoEBalanceCallback(keep_model_aux_loss=True) (with TRL, "
                "also set router_aux_loss_coef in its config).", UserWarning, stacklevel=2)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self._step_skipped(optimizer):
            self.balancer.reset_window()  # fp16 overflow: no applied step, no bias update
        else:
            self.balancer.step()
        return control

    def _step_skipped(self, optimizer: Any) -> bool:
        trainer = self._trainer_ref() if self._trainer_ref else None
        engine = getattr(trainer, "deepspeed", None) if trainer is not None else None
        if engine is not None and hasattr(engine, "was_step_applied"):
            return not engine.was_step_applied()
        return bool(getattr(optimizer, "step_was_skipped", False))

    def train_metrics(self) -> dict[str, float]:
        metrics = self.balancer.metrics()
        if self._stats is not None:
            trainer = self._trainer_ref() if self._trainer_ref else None
            step = trainer.state.global_step if trainer is not None else self.balancer.num_steps
            self._stats.write(step, metrics, self.balancer)
        trainer = self._trainer_ref() if self._trainer_ref else None
        if trainer is not None and self._images.every:  # called on the main process, before the reporters log
            self._images.log(trainer.state.global_step, self.balancer, _image_targets(trainer),
                             maxvio=metrics["maxvio_global"])
        keep = metrics if self.config.log_per_layer else {k: v for k, v in metrics.items() if "/" not in k}
        return prefixed(keep)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Without the trainer wrapper (not found), at least put the metrics in log_history.
        if self._trainer_ref is None and logs is not None and "loss" in logs and state.is_world_process_zero:
            extra = self.train_metrics()
            logs.update(extra)
            if state.log_history:
                state.log_history[-1].update(extra)
        return control

    @property
    def export_agreement(self) -> float | None:
        """Lowest per-layer top-k agreement of the shipped model with the trained one (None before the end)."""
        return self.export.get("topk_agreement")

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        """The trained routing must survive without moe-balance: fold whatever bias the generic routers still
        apply into their weights (nothing once the online fold carries it), and log the balance the saved model
        routes with in stock transformers beside the one it had with the bias (``ship_batches`` training batches)."""
        if not self.ship or self.balancer is None or model is None:
            return control
        from moe_balance import export
        trainer = self._trainer_ref() if self._trainer_ref else None
        self.trained_bias_LE = self.balancer.bias_LE.detach().clone()  # a fold zeroes it: keep what training made
        shipped = export.ship(model, train_dataloader, limit=self.ship_batches)
        self.export = shipped  # routing_differ, topk_agreement, maxvio_trained, maxvio_served
        if trainer is not None:  # the Trainer's own log: console, log_history and the reporters
            trainer.log({f"moe_balance/export_{key}": value for key, value in shipped.items()})
        return control

    # ------------------------------------------------------------ checkpoints
    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                self.balancer.save(folder / STATE_FILE)
        return control

    def restore(self, checkpoint: str | os.PathLike) -> bool:
        """Load ``moe_balance.pt`` from a checkpoint folder if present (tensors only, nothing unpickled)."""
        path = Path(checkpoint) / STATE_FILE
        if not path.exists():
            logger.warning("moe_balance: %s has no %s; the balancer starts fresh", checkpoint, STATE_FILE)
            return False
        self.balancer.load(path)
        return True

    def state(self) -> dict[str, Any]:
        """ExportableState: the balancer travels in ``trainer_state.json``; ``args`` rebuild this callback."""
        return {"args": {"config": self.config.to_dict(), "write_stats": self.write_stats,
                         "repair_resume": self.repair_resume, "heatmap_every": self.heatmap_every,
                         "keep_model_aux_loss": self.keep_model_aux_loss, "ship": self.ship,
                         "ship_batches": self.ship_batches},
                "attributes": {"restored_state": _to_json(self.balancer.state_dict())
                               if self.balancer is not None else None}}

    def unpatch(self, model: torch.nn.Module, **kwargs: Any) -> None:
        """Restore the model's original routers (see :func:`moe_balance.unpatch`)."""
        patching.unpatch(model, **kwargs)


def _router_configs(model: torch.nn.Module | None) -> list[Any]:
    """The model config and its text config (composite models keep ``output_router_logits`` there), each once."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [c for c in ([config] if text is config else [config, text]) if hasattr(c, "output_router_logits")]


def _trl_will_enable(args: Any, model: torch.nn.Module | None) -> bool:
    """A TRL config (it has ``router_aux_loss_coef``) left at None takes the model's own non-zero coefficient."""
    if not hasattr(args, "router_aux_loss_coef") or args.router_aux_loss_coef is not None:
        return False
    configs = _router_configs(model)
    return bool(configs) and bool(getattr(configs[-1], "router_aux_loss_coef", 0.0))


def _check_trl_coef(args: Any, trainer: Any, keep: bool) -> None:
    """An explicit non-zero ``router_aux_loss_coef`` in a TRL config asks for the model's pooled aux loss:
    together with this callback that is two balancing losses, unless ``keep_model_aux_loss=True``."""
    coef = getattr(args, "router_aux_loss_coef", None)
    if keep or coef is None or coef == 0:
        return
    owner = type(trainer).__name__ if trainer is not None else "the trainer"
    raise ValueError(
        f"{type(args).__name__}.router_aux_loss_coef={coef!r} turns on the model's pooled router aux loss in {owner}, "
        "and MoEBalanceCallback balances the routers itself: both would train the routers. Either leave "
        "router_aux_loss_coef unset (or 0.0) and let the callback balance (its aux_loss= / bias_update=), or keep "
        "both explicitly with MoEBalanceCallback(..., keep_model_aux_loss=True).")


def _image_targets(trainer: Any) -> list[Any]:
    """The reporters' writers that take images: TensorBoardCallback's SummaryWriter, WandbCallback's run."""
    targets = []
    for callback in trainer.callback_handler.callbacks:
        writer = getattr(callback, "tb_writer", None)
        run = getattr(getattr(callback, "_wandb", None), "run", None)
        targets += [t for t in (writer, run) if t is not None]
    return targets


def _to_json(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            out[key] = {"dtype": str(value.dtype).removeprefix("torch."), "data": value.tolist()}
        else:
            out[key] = value
    return out


def _from_json(data: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and set(value) == {"dtype", "data"}:
            out[key] = torch.tensor(value["data"], dtype=getattr(torch, value["dtype"]))
        else:
            out[key] = value
    return out
