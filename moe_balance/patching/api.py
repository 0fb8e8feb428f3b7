"""`patch` / `unpatch` / `find_routers`: put a Balancer behind the routers of an existing model."""

from __future__ import annotations

import types
import warnings
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import torch
from torch import nn

from ..balancer import Balancer
from ..config import BalanceConfig, resolve_config
from . import registry, versions
from ..balancer import load_state_file
from .folding import FoldIntoRouters, fold_targets
from .strategies import (STRATEGIES, BatchInfoHook, NativeBiasSync, PatchState, RouterSite, find_native_bias,
                         full_shape, gathered, read_native, write_native)

_ATTR = "_moe_balance"
_CLASS_CACHE: dict[tuple[str, type], type] = {}


def _balanced_class(strategy: str, cls: type) -> type:
    """One subclass per (strategy, router class), reused so patching twice changes nothing."""
    key = (strategy, cls)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(f"Balanced{cls.__name__}", (STRATEGIES[strategy], cls),
                                 {"__module__": cls.__module__, "_mb_original_class": cls})
    return _CLASS_CACHE[key]


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def find_routers(model: nn.Module) -> list[dict[str, Any]]:
    """Every router-like module: name, class, experts, top-k, scoring and the strategy that applies."""
    config = getattr(model, "config", None)
    modules = dict(model.named_modules())
    found = []
    for name, module in modules.items():
        cls = registry.original_class(module)
        if not (registry.is_router_candidate(module) or registry.is_gate_block(module)):
            continue
        strategy, score_func = registry.detect(module, config)
        experts, top_k = registry.router_shape(module, config)
        parent_name = name.rpartition(".")[0]
        if not registry.selects_itself(module) and parent_name in modules \
                and registry.selects_itself(modules[parent_name]):
            # the router scores, its MoE block chooses (transformers 5.6 DeepSeek-V3, 4.57 HunYuan): patch the block
            name = parent_name
            strategy = strategy or registry.detect(modules[parent_name], config)[0]
        found.append({"name": name, "class": cls.__name__, "num_experts": experts, "top_k": top_k,
                      "score_func": score_func, "strategy": strategy})
    return found


class UnsupportedModelError(ValueError):
    """The model has no router moe_balance knows how to patch."""


def _unsupported(model: nn.Module, found: list[dict[str, Any]]) -> UnsupportedModelError:
    model_type = model_type_of(model)
    reason = registry.UNSUPPORTED.get(model_type or "")
    seen = ", ".join(f"{f['name']} ({f['class']})" for f in found) or "none"
    lines = [f"moe_balance cannot patch {type(model).__name__} (model_type={model_type!r}).",
             f"Reason: {reason}." if reason else
             "Looked for modules whose class name ends in 'Router' or 'Gate' (or registered router classes) "
             "that call torch.topk over their experts or own an e_score_correction_bias buffer.",
             f"Router-like modules seen: {seen}.",
             "To support it, register its router class:",
             "    import moe_balance as mb",
             "    mb.register_router(MyRouterClass, 'generic', num_experts='num_experts', top_k='top_k')",
             f"Supported model types: {sorted(registry.MODEL_TYPES)}"]
    return UnsupportedModelError("\n".join(lines))


def patch(model: nn.Module, config: BalanceConfig | Mapping[str, Any] | None = None, *,
          state: str | Path | Mapping[str, Any] | None = None, attach_loss: bool = False,
          selftest: bool = True, process_group: object | None = None, **overrides: Any) -> Balancer:
    """Patch every router of ``model`` and return the :class:`Balancer` behind them.

    Args:
        model: a transformers MoE model (or any module whose routers are registered).
        config: a :class:`BalanceConfig` or dict; keyword ``overrides`` are merged in.
        state: a saved balancer state (path or state dict) to continue from, e.g. beside a checkpoint.
        attach_loss: add each layer's balance loss to the backward pass through the router output
            (no change to the training loop). Otherwise take it with ``balancer.loss()``.
        selftest: check, on the model's first forward, that every patched router really ran through
            the patch (a hub kernel or custom block may bypass it); a bypass raises there and unpatches.
            No extra forward is run: sharded or partitioned weights (ZeRO-3, FSDP2) are not touched.
        process_group: the ranks whose router counts are summed at each step: those that route different
            tokens (data parallel, and context parallel), not tensor-parallel ranks, which see the same ones.
            Default WORLD. With your own FSDP2 mesh pass its data-parallel group, e.g.
            ``mesh.get_group("dp")``, or ``mesh["dp", "cp"]._flatten("dp_cp").get_group()`` over several
            dimensions. The DeepSpeed, Accelerate and Trainer integrations set it from their engine.

    Example:
        >>> import torch, moe_balance as mb
        >>> from transformers import MixtralConfig, MixtralForCausalLM
        >>> cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4)
        >>> model = MixtralForCausalLM(cfg)
        >>> bal = mb.patch(model, bias_update="sign")
        >>> _ = model(torch.randint(0, 64, (2, 8)))
        >>> bal.step(); round(bal.metrics()["tokens"])
        16
        >>> mb.unpatch(model)
    """
    cfg = resolve_config(config, **overrides)
    existing = getattr(model, _ATTR, None)
    if existing is not None:
        if existing.balancer.config != cfg:
            raise ValueError("model is already patched with another config; call moe_balance.unpatch(model) first")
        return existing.balancer
    # Read a saved state first: a bad file fails before the model is touched.
    saved_state = load_state_file(state) if isinstance(state, (str, Path)) else state
    found = find_routers(model)
    usable = [f for f in found if f["strategy"] is not None]
    model_type = model_type_of(model)
    if not usable or model_type in registry.UNSUPPORTED:
        raise _unsupported(model, found)
    shapes = {(f["num_experts"], f["top_k"]) for f in usable}
    if len(shapes) != 1 or None in next(iter(shapes)):
        raise UnsupportedModelError(f"moe_balance: routers of {type(model).__name__} disagree on or hide their "
                                    f"(num_experts, top_k): {sorted(map(str, shapes))}; register them with "
                                    "num_experts=/top_k= getters")
    num_experts, top_k = shapes.pop()
    modules = dict(model.named_modules())
    check_parity = selftest and _needs_parity_check(model_type, [modules[f["name"]] for f in usable])
    router_dim = _fold_router_dim(cfg, usable, modules, num_experts)
    balancer = Balancer(cfg, num_layers=len(usable), num_experts=num_experts, top_k=top_k,
                        process_group=process_group, router_dim=router_dim)
    # A first guess only: the balancer follows the routers' device at their first call (Balancer._follow).
    # Offloaded weights (accelerate's cpu/disk offload) sit on meta until their hooks load them.
    devices = [p.device for p in model.parameters() if p.device.type != "meta"]
    if devices:
        balancer.to(devices[0])
    patch_state = PatchState(balancer=balancer, attach_loss=attach_loss)
    for layer, info in enumerate(usable):
        module = modules[info["name"]]
        site = RouterSite(info["name"], layer, module, type(module), info["strategy"], num_experts, top_k,
                          info["score_func"], patch_state)
        parent = modules[info["name"].rpartition(".")[0]] if "." in info["name"] else model
        native = find_native_bias(module, parent, num_experts)
        if site.strategy == "native_bias" and native is None:
            raise UnsupportedModelError(f"moe_balance: router {info['name']} was classified native_bias but holds no "
                                        f"selection-bias buffer of {num_experts} experts")
        if native is not None and site.strategy in ("native_bias", "generic"):
            # The model adds its own bias buffer: the master (fp32) starts from it and is written back
            # after every step, so save_pretrained ships the trained bias to stock transformers.
            site.native_owner, site.native_attr = native
            with gathered([site.native_bias]):  # a ZeRO-3 partitioned parameter (AFMoE) is read whole
                native_now = read_native(site.native_bias).detach()  # an FSDP2 shard too
                site.native_original = native_now.clone()
                if native_now.device.type != "meta":  # offloaded: nothing to read; the master starts at 0
                    balancer.bias_LE[layer].copy_(native_now.float().reshape(-1))
        patch_state.sites.append(site)
    native_sites = [s for s in patch_state.sites if s.native_owner is not None]
    if router_dim is not None:
        balancer.post_step_hooks.append(FoldIntoRouters(folded_sites(patch_state)))
    if native_sites:
        balancer.step_callbacks.append(NativeBiasSync(native_sites))
    for site in patch_state.sites:
        site.module.__dict__["_mb_site"] = site
        site.module.__class__ = _balanced_class(site.strategy, site.original_class)
        _route_hook_through_patch(site)
    handle = model.register_forward_pre_hook(BatchInfoHook(patch_state), with_kwargs=True)
    patch_state.hook_ids.append(handle.id)
    model.__dict__[_ATTR] = patch_state
    _disable_builtin_aux(model, cfg, patch_state)
    try:
        if saved_state is not None:
            balancer.load_state_dict(saved_state)
    except Exception:
        unpatch(model)
        raise
    if check_parity:
        patch_state.parity_pending = {site.layer for site in patch_state.sites}
    if selftest:
        patch_state.forward_hits = set()
        handle = model.register_forward_hook(FirstForwardCheck(model, patch_state))
        patch_state.check_hook_id = handle.id
    return balancer


def _needs_parity_check(model_type: str | None, routers: list[nn.Module]) -> bool:
    """A transformers architecture not verified on the installed release is compared with its stock routing on the
    first forward (see :mod:`.versions`); routers registered by the user or DeepSpeed's gates are not."""
    from_transformers = any(registry.transformers_package(m) for m in routers)
    if model_type is None or versions.is_verified(model_type) or not from_transformers:
        return False
    release = versions.installed_series()
    where = versions.verified_on(model_type)
    reason = registry.UNVERIFIED.get(model_type) or versions.BROKEN.get((model_type, release))
    warnings.warn(f"moe_balance: model_type {model_type!r} is not verified on transformers {release} (verified on "
                  f"{', '.join(where) or 'no tested release'}{'; ' + reason if reason else ''}): its patched routers "
                  "are compared with the stock ones at a zero bias on the first forward, and refused if they differ",
                  UserWarning, stacklevel=3)
    return True


def folded_sites(state: PatchState) -> list[RouterSite]:
    """Routers whose bias lives only in the balancer (no native buffer ships it): what the fold moves."""
    return [s for s in state.sites if s.native_owner is None and s.strategy != "native_bias"]


def _fold_router_dim(cfg: BalanceConfig, usable: list[dict[str, Any]], modules: dict[str, nn.Module],
                     num_experts: int) -> int | None:
    """The router input width for the online fold, or None when nothing is folded (fold off, or only native-bias
    routers). A generic router without one ``[E, D]`` weight cannot carry the bias: refused with the way out."""
    if cfg.fold_share_resolved == 0:
        return None
    dims = set()
    for info in usable:
        module = modules[info["name"]]
        if info["strategy"] == "native_bias":
            continue
        parent = modules[info["name"].rpartition(".")[0]] if "." in info["name"] else None
        if info["strategy"] == "generic" and find_native_bias(module, parent, num_experts) is not None:
            continue
        site = RouterSite(info["name"], 0, module, type(module), info["strategy"], num_experts, 1, "softmax",
                          None)
        targets = fold_targets(site)
        if targets is None:
            raise UnsupportedModelError(
                f"moe_balance: router {info['name']} ({type(module).__name__}) has no single [{num_experts}, D] "
                "weight for the online fold to move the bias into; patch with fold_share=0 (the bias then lives "
                "beside the weights and is lost when the model is served)")
        dims.add(full_shape(targets[0])[1])
    if len(dims) > 1:
        raise UnsupportedModelError(f"moe_balance: router input widths differ across layers ({sorted(dims)}); "
                                    "patch with fold_share=0")
    return dims.pop() if dims else None


def _route_hook_through_patch(site: RouterSite) -> None:
    """accelerate's hooks (``device_map`` dispatch, CPU/disk offload) replace ``module.forward`` by a
    wrapper that calls the forward bound when the hook was added, which would bypass the class swap."""
    module = site.module
    if "_old_forward" in module.__dict__ and "_mb_saved_old_forward" not in module.__dict__:
        module.__dict__["_mb_saved_old_forward"] = module.__dict__["_old_forward"]
        module.__dict__["_old_forward"] = types.MethodType(type(module).forward, module)


def _disable_builtin_aux(model: nn.Module, cfg: BalanceConfig, patch_state: PatchState) -> None:
    """With a moe_balance aux loss, the model's own pooled one must not be added on top."""
    config = getattr(model, "config", None)
    patch_state.saved_output_router_logits = getattr(config, "output_router_logits", None)
    if cfg.uses_aux and getattr(config, "output_router_logits", False):
        warnings.warn("moe_balance: turning off the model's own router aux loss (config.output_router_logits=False) "
                      f"because aux_loss={cfg.aux_loss!r} is balanced per layer by moe_balance", UserWarning,
                      stacklevel=3)
        config.output_router_logits = False


def _dummy_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", None)
    if not vocab:
        raise RuntimeError("cannot build a self-test input (no vocab_size); pass selftest=False")
    device = next(model.parameters()).device
    ids = torch.arange(8, device=device).reshape(2, 4) % vocab
    inputs = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    return inputs


def _bypass_error(missing: list[str], when: str) -> RuntimeError:
    return RuntimeError(f"moe_balance: patched routers did not run through the patch in {when}: {missing}. "
                        "A hub kernel, a compiled forward or a custom block may bypass the router module; "
                        "disable kernels (use_kernels=False) or register the module that really routes.")


class FirstForwardCheck:
    """Forward hook: after the model's first forward, every patched router must have reported.

    Checking on a real forward instead of a test forward keeps patching free of side effects and
    safe on engines whose weights are sharded or partitioned until their own hooks gather them.
    A class (not a closure) so that ``deepcopy`` of a patched model checks the copy.
    """

    def __init__(self, model: nn.Module, state: PatchState) -> None:
        self.model, self.state = model, state

    def __call__(self, module, args, output):
        state = self.state
        hits, state.forward_hits = state.forward_hits, None
        self.model._forward_hooks.pop(state.check_hook_id, None)
        state.check_hook_id = None
        missing = [s.name for s in state.sites if s.layer not in (hits or ())]
        if missing:
            unpatch(self.model)
            raise _bypass_error(missing, "the model's first forward (the patch was removed)")
        if state.parity_failures:
            failed, state.parity_failures = state.parity_failures, []
            unpatch(self.model)
            model_type = model_type_of(self.model)
            raise versions.UnverifiedRouterError(
                f"moe_balance: model_type {model_type!r} is not verified on transformers {versions.installed_series()} "
                f"(verified on {', '.join(versions.verified_on(model_type or '')) or 'no tested release'}), and "
                f"at a zero bias its patched routers do not route as the stock ones: {failed}. The patch was removed. "
                "Use a verified transformers release, or register the router with moe_balance.register_router.")


@torch.no_grad()
def run_selftest(model: nn.Module) -> None:
    """An explicit check now: one tiny forward (no counting, RNG preserved); every patched router
    must report through the patch, or raise. Not for sharded models (it runs a forward)."""
    patch_state: PatchState = model.__dict__[_ATTR]
    was_training = model.training
    patch_state.selftest_hits = set()
    try:
        with torch.random.fork_rng(devices=[]):
            model.eval()
            model(**_dummy_inputs(model))
    finally:
        hits, patch_state.selftest_hits = patch_state.selftest_hits, None
        model.train(was_training)
    missing = [s.name for s in patch_state.sites if s.layer not in hits]
    if missing:
        raise _bypass_error(missing, "a test forward")


def unpatch(model: nn.Module, *, keep_native_bias: bool = False) -> None:
    """Restore the model exactly as it was before :func:`patch` (a no-op if it is not patched).

    ``keep_native_bias=True`` leaves the trained bias in native ``e_score_correction_bias`` buffers
    (so ``save_pretrained`` afterwards ships it); by default they get their original values back.
    """
    patch_state: PatchState | None = model.__dict__.pop(_ATTR, None)
    if patch_state is None:
        return
    for hook_id in patch_state.hook_ids:  # by id: a deepcopy's handles would point at the original's dicts
        model._forward_pre_hooks.pop(hook_id, None)
        model._forward_pre_hooks_with_kwargs.pop(hook_id, None)
    if patch_state.check_hook_id is not None:
        model._forward_hooks.pop(patch_state.check_hook_id, None)
    for site in patch_state.sites:
        site.module.__class__ = site.original_class
        site.module.__dict__.pop("_mb_site", None)
        if "_mb_saved_old_forward" in site.module.__dict__:
            site.module.__dict__["_old_forward"] = site.module.__dict__.pop("_mb_saved_old_forward")
        if site.native_original is not None and not keep_native_bias:
            with torch.no_grad(), gathered([site.native_bias], modify=True):
                write_native(site.native_bias, site.native_original)  # also into shards made after patching
    config = getattr(model, "config", None)
    saved = patch_state.saved_output_router_logits
    if config is not None and saved is not None:
        config.output_router_logits = saved


def patch_state_of(model: nn.Module) -> PatchState | None:
    """The shared state of a patched model (None if not patched)."""
    return model.__dict__.get(_ATTR)
