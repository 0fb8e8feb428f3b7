"""How a patched router forward runs, one class per strategy.

Every strategy is a mixin put in front of the router's own class (``module.__class__`` swap, so
``deepcopy`` and ``state_dict`` keep working and ``unpatch`` only swaps back). Per instance it
reads ``_mb_site`` (a :class:`RouterSite`: layer index, shared patch state) from ``__dict__``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .interception import SelectionInterceptor


class AttachLoss(torch.autograd.Function):
    """Identity on ``x`` whose backward also feeds ``scale`` into ``loss`` (Megatron's aux-loss scaler)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
        ctx.scale = scale  # a tensor (e.g. a GradScaler's) stays on device: no host sync
        ctx.loss_shape = loss.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor):
        grad_loss = torch.ones(ctx.loss_shape, dtype=torch.float32, device=grad_x.device) * ctx.scale
        return grad_x, grad_loss, None


@dataclass
class PatchState:
    """What all patched routers of one model share."""

    balancer: Any
    attach_loss: bool = False
    loss_scale: float = 1.0
    """Factor on the attached loss gradient: 1 / gradient accumulation steps in the integrations."""
    grad_scale: Any = None
    """Optional callable giving the mixed-precision loss scale (fp16) the backward runs at."""
    mask_BS: torch.Tensor | None = None
    measuring: bool = True
    selftest_hits: set[int] | None = None
    sites: list[RouterSite] = field(default_factory=list)
    hook_ids: list[int] = field(default_factory=list)
    saved_output_router_logits: Any = None


@dataclass
class RouterSite:
    """One patched router: where it is, what it routes, how it was patched."""

    name: str
    layer: int
    module: torch.nn.Module
    original_class: type
    strategy: str
    num_experts: int
    top_k: int
    score_func: str
    state: PatchState
    native_original: torch.Tensor | None = None


def in_backward_recompute() -> bool:
    """True inside the autograd engine (a gradient-checkpoint recomputation of the forward).

    Compiled graphs never re-run this Python during backward, so the check is skipped there.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def report(site: RouterSite, logits_TE: torch.Tensor, idx_TK: torch.Tensor, output: Any,
           dropped: torch.Tensor | None = None) -> Any:
    """Hand one router call to the balancer; attach the loss to the router output if asked."""
    state = site.state
    if state.selftest_hits is not None:
        state.selftest_hits.add(site.layer)
        return output
    if not state.measuring:
        return output
    recompute = in_backward_recompute()
    logits_TE = logits_TE.reshape(-1, site.num_experts)
    mask = state.mask_BS
    mask_T = seq_len = None
    if mask is not None and mask.dim() == 2 and mask.numel() == logits_TE.shape[0]:
        mask_T, seq_len = mask.reshape(-1), mask.shape[1]
    scores = torch.sigmoid(logits_TE.float()) if site.score_func == "sigmoid" else None
    loss = state.balancer.observe(site.layer, logits_TE, idx_TK.reshape(logits_TE.shape[0], -1), mask_T,
                                  scores=scores, seq_len=seq_len, collect=not state.attach_loss,
                                  record=not recompute, dropped=dropped)
    if state.attach_loss and loss.requires_grad:
        scale = state.loss_scale * (state.grad_scale() if state.grad_scale is not None else 1.0)
        return attach_to_output(output, loss, scale)
    return output


def attach_to_output(output: Any, loss: torch.Tensor, scale: float) -> Any:
    """Attach to the routing weights (used downstream), else the first tensor needing grad."""
    items = list(output) if isinstance(output, tuple) else [output]
    order = [1, 0] + list(range(2, len(items))) if len(items) > 1 else [0]
    for i in order:
        item = items[i]
        if isinstance(item, torch.Tensor) and item.is_floating_point() and item.requires_grad:
            items[i] = AttachLoss.apply(item, loss, scale)
            return tuple(items) if isinstance(output, tuple) else items[0]
    return output


class InterceptSelection:
    """Generic strategy: bias the router's own top-k call (see :mod:`.interception`)."""

    _mb_zero_is_masked = False
    _mb_argmax = False
    _mb_clone_logits = False

    def forward(self, *args, **kwargs):
        site: RouterSite = self.__dict__["_mb_site"]
        bias_E = site.state.balancer.bias_LE[site.layer] if site.state.balancer.config.uses_bias else None
        mode = SelectionInterceptor(bias_E, site.num_experts, site.top_k, self._mb_zero_is_masked,
                                    self._mb_argmax, self._mb_clone_logits)
        with mode:
            output = super().forward(*args, **kwargs)
        if mode.intercepted == 0 or mode.indices is None:
            raise RuntimeError(
                f"moe_balance: router {site.name} ({site.original_class.__name__}) made no top-k call over "
                f"{site.num_experts} experts with k={site.top_k}; its routing is not supported by the generic "
                "strategy. Register an adapter with moe_balance.register_router.")
        logits = mode.logits
        if logits is None:
            logits = next(t for t in (output if isinstance(output, tuple) else (output,))
                          if isinstance(t, torch.Tensor) and t.shape[-1] == site.num_experts)
        return report(site, logits, mode.indices, output, self._mb_dropped(output))

    def _mb_dropped(self, output) -> torch.Tensor | None:
        return None


class InterceptGroupLimited(InterceptSelection):
    """Group-limited softmax routers (DeepSeek-V2): excluded groups are zeroed, keep them out."""

    _mb_zero_is_masked = True


class InterceptDeepSpeedGate(InterceptSelection):
    """``deepspeed.moe.sharded_moe.TopKGate``: top-1/top-2 choose by argmax, top-k by topk.

    The bias goes where DeepSpeed ranks: softmax probabilities for the first expert (and for top-k),
    the (noised) logits for top-2's second expert. Capacity and ``l_aux`` stay DeepSpeed's own;
    the share of assignments DeepSpeed dropped at capacity is reported as ``capacity_dropped``.
    Output: ``(l_aux, combine_weights, dispatch_mask, exp_counts)``.
    """

    _mb_argmax = True
    _mb_clone_logits = True

    def _mb_dropped(self, output) -> torch.Tensor | None:
        if not isinstance(output, tuple):
            return None
        if len(output) == 7:  # sparse routes: (l_aux, C, E, indices, locations, gates, counts), evicted < 0
            indices = output[3]
            return (indices < 0).sum().to(torch.float64) / max(1, indices.numel())
        dispatch_mask = output[2] if len(output) > 2 else None
        if not isinstance(dispatch_mask, torch.Tensor) or dispatch_mask.dim() != 3:
            return None
        site: RouterSite = self.__dict__["_mb_site"]
        return 1.0 - dispatch_mask.sum().to(torch.float64) / (dispatch_mask.shape[0] * site.top_k)


class NativeCorrectionBias:
    """DeepSeek-V3 family: the router adds ``e_score_correction_bias`` for selection only.

    The balancer keeps the fp32 master; after each step it is written into the buffer in the
    buffer's own dtype (see :func:`sync_native_bias`). Output: ``(logits, weights, indices)``.
    """

    def forward(self, *args, **kwargs):
        site: RouterSite = self.__dict__["_mb_site"]
        output = super().forward(*args, **kwargs)
        logits, _, indices = output
        return report(site, logits, indices, output)


class NativeBiasSync:
    """Step callback copying the fp32 master bias into each native buffer, in the buffer's dtype.

    A class, not a closure, so that ``deepcopy`` of a patched model points the copy at its own routers.
    """

    def __init__(self, sites: list[RouterSite]) -> None:
        self.sites = sites

    @torch.no_grad()
    def __call__(self, balancer) -> None:
        if not balancer.config.uses_bias:
            return
        for site in self.sites:
            buf = site.module.e_score_correction_bias
            buf.copy_(balancer.bias_LE[site.layer].to(device=buf.device, dtype=buf.dtype))


class AttentionMaskHook:
    """Forward pre-hook on the top-level model: routers never see the attention mask, so keep it."""

    def __init__(self, state: PatchState) -> None:
        self.state = state

    def __call__(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")  # by keyword only: a positional 2nd argument may be anything
        self.state.mask_BS = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


STRATEGIES: dict[str, type] = {
    "generic": InterceptSelection,
    "group_limited": InterceptGroupLimited,
    "native_bias": NativeCorrectionBias,
    "deepspeed_gate": InterceptDeepSpeedGate,
}
