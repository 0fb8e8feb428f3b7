"""How a patched router forward runs, one class per strategy.

Every strategy is a mixin put in front of the router's own class (``module.__class__`` swap, so
``deepcopy`` and ``state_dict`` keep working and ``unpatch`` only swaps back). Per instance it
reads ``_mb_site`` (a :class:`RouterSite`: layer index, shared patch state) from ``__dict__``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..losses import scores_to_probs
from ..scaling import BackwardScale, ScaleValue
from .interception import SelectionInterceptor


class AttachLoss(torch.autograd.Function):
    """Identity on ``x`` whose backward also feeds ``scale()`` into ``loss`` (Megatron's aux-loss scaler).

    ``scale`` is read in the backward: a dynamic fp16 loss scale or a shorter last accumulation
    window is the one the language-model loss of the same backward was scaled with.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor, scale: Callable[[], ScaleValue]) -> torch.Tensor:
        ctx.scale = scale
        ctx.loss_shape, ctx.loss_device = loss.shape, loss.device
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor):
        scale = ctx.scale()
        if isinstance(scale, torch.Tensor):  # e.g. a GradScaler's scale: stays on device, no host sync
            scale = scale.to(ctx.loss_device, torch.float32)
        grad_loss = torch.ones(ctx.loss_shape, dtype=torch.float32, device=ctx.loss_device) * scale
        return grad_x, grad_loss, None


@dataclass
class BatchInfo:
    """What the top-level forward knew about the batch; routers only see flattened tokens."""

    shape_BS: tuple[int, int] | None = None
    mask_BS: torch.Tensor | None = None
    position_ids_BS: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int | None:
        return None if self.shape_BS is None else self.shape_BS[0] * self.shape_BS[1]

    def mask_for(self, T: int) -> torch.Tensor | None:
        mask = self.mask_BS
        return mask.reshape(-1) if mask is not None and mask.numel() == T else None

    def segments_for(self, T: int, device: torch.device) -> torch.Tensor | None:
        """Sequence id per token: packed pieces (``cu_seq_lens`` or ``position_ids`` resets), else rows."""
        if self.num_tokens != T:
            return None
        if self.cu_seqlens is not None and int(self.cu_seqlens.numel()) > 1:
            ends = self.cu_seqlens.to(device)[1:]
            return torch.searchsorted(ends, torch.arange(T, device=device), right=True).clamp_max(T - 1)
        if self.position_ids_BS is not None:
            starts_BS = self.position_ids_BS.to(device) == 0
            starts_BS[:, 0] = True  # every row starts a sequence, whatever its first position
            return starts_BS.reshape(-1).long().cumsum(0) - 1
        return torch.arange(T, device=device) // self.shape_BS[1]


@dataclass
class PatchState:
    """What all patched routers of one model share."""

    balancer: Any
    attach_loss: bool = False
    backward_scale: Callable[[], ScaleValue] = field(default_factory=BackwardScale)
    """Factor on the attached loss gradient (accumulation and fp16 loss scale; see ``moe_balance.scaling``)."""
    batch: BatchInfo = field(default_factory=BatchInfo)
    selftest_hits: set[int] | None = None
    forward_hits: set[int] | None = None
    """Layers that reported during the model's first forward (see ``api.FirstForwardCheck``)."""
    check_hook_id: int | None = None
    sites: list[RouterSite] = field(default_factory=list)
    hook_ids: list[int] = field(default_factory=list)
    saved_output_router_logits: Any = None
    # Forwards recorded this window, per layer, whose gradient-checkpoint recomputation must not count again.
    recorded_forwards: dict[int, int] = field(default_factory=dict)
    recorded_window: int = -1
    warned_recompute_attach: bool = False
    parity_pending: set[int] = field(default_factory=set)
    """Layers whose stock forward is still to be compared with the patched one (a release not verified)."""
    parity_failures: list[str] = field(default_factory=list)
    capture: Callable[..., None] | None = None
    """Called by every router call with ``(site, indices, linear_call)`` (export; see moe_balance.export)."""


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
    native_owner: torch.nn.Module | None = None
    """Module holding the model's own selection-bias buffer (router, its child, or the MoE block)."""
    native_attr: str | None = None
    native_original: torch.Tensor | None = None
    attach_index: int | None = None
    """Which router output carries the gate weights (the attached loss rides there); found once."""

    @property
    def native_bias(self) -> torch.Tensor | None:
        """Looked up each time: moving the model replaces the buffer object."""
        return None if self.native_owner is None else getattr(self.native_owner, self.native_attr)


def in_backward_recompute() -> bool:
    """True inside the autograd engine (a gradient-checkpoint recomputation of the forward).

    Compiled graphs never re-run this Python during backward, so the check is skipped there.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def should_record(site: RouterSite, recompute: bool) -> bool | None:
    """Whether this router call adds to the training window: True, False (loss only), None (ignore).

    * inside ``balancer.measuring()`` (evaluation): recorded, the bias is not moved by it;
    * a forward without grad outside measuring (``generate``, an unwrapped eval loop): ignored;
      also the first pass of *reentrant* checkpointing, which is recorded at its recomputation;
    * a training forward (grad on): recorded once; its non-reentrant recomputation is not.
    """
    state, bal = site.state, site.state.balancer
    if bal.is_measuring:
        return True
    if state.recorded_window != bal.window_index:
        state.recorded_forwards, state.recorded_window = {}, bal.window_index
    recorded = state.recorded_forwards.get(site.layer, 0)
    if recompute:
        if recorded > 0:
            state.recorded_forwards[site.layer] = recorded - 1
            return False
        return True  # reentrant checkpointing: the first pass ran without grad and was not recorded
    if not torch.is_grad_enabled():
        return None
    state.recorded_forwards[site.layer] = recorded + 1
    return True


def report(site: RouterSite, logits_TE: torch.Tensor, idx_TK: torch.Tensor, output: Any,
           dropped: torch.Tensor | None = None, weights_hint: int | None = None,
           ranked_TE: torch.Tensor | None = None, router_input: torch.Tensor | None = None,
           unbiased_idx: torch.Tensor | None = None) -> Any:
    """Hand one router call to the balancer; attach the loss to the router output if asked."""
    state = site.state
    if state.forward_hits is not None:
        state.forward_hits.add(site.layer)
    if state.selftest_hits is not None:
        state.selftest_hits.add(site.layer)
        return output
    recompute = in_backward_recompute()
    record = should_record(site, recompute)
    if record is None:
        return output
    raw_logits = logits_TE
    logits_TE = logits_TE.reshape(-1, site.num_experts)
    T = logits_TE.shape[0]
    bal = state.balancer
    segment_T = state.batch.segments_for(T, logits_TE.device) if bal.config.aux_loss == "seq" else None
    # The router's own scores, normalised over experts as the losses expect (DeepSeek-V3's f*P does so);
    # only a loss reads them.
    scores = scores_to_probs(logits_TE, "sigmoid") if site.score_func == "sigmoid" and bal.config.uses_loss \
        else None
    # A reentrant recomputation is the only pass with grad: its loss must be attached, whatever attach_loss says.
    forced = recompute and record and not state.attach_loss
    # Prices are set from training windows only; a measuring window is never stepped with a bias update.
    wants_prices = bal.config.uses_quantile and record and not bal.is_measuring
    selection = selection_scores(site, logits_TE, ranked_TE) if wants_prices else None
    loss = bal.observe(site.layer, logits_TE, idx_TK.reshape(T, -1), state.batch.mask_for(T), scores=scores,
                       segment_ids=segment_T, selection_scores=selection,
                       collect=not (state.attach_loss or recompute), record=record, dropped=dropped,
                       router_input=router_input if router_input is not None and router_input.shape[:-1].numel() == T
                       else None, unbiased_idx=unbiased_idx)
    if forced and loss.requires_grad and not state.warned_recompute_attach:
        state.warned_recompute_attach = True
        warnings.warn("moe_balance: reentrant gradient checkpointing computes the balance loss during backward; "
                      "it is attached to the router outputs there (balancer.loss() cannot hold it). "
                      "Use attach_loss=True or non-reentrant checkpointing to silence this.",
                      RuntimeWarning, stacklevel=2)
    if (state.attach_loss or forced) and loss.requires_grad:
        return attach_to_output(site, output, loss, raw_logits, weights_hint)
    return output


def selection_scores(site: RouterSite, logits_TE: torch.Tensor, ranked_TE: torch.Tensor | None) -> torch.Tensor:
    """The unbiased scores the router ranks, in the space the bias is added to (quantile prices are
    quantiles of these).

    Interception saw them (read in logit space when the config ranks logits; experts of excluded groups
    at -inf; minus the model's own bias buffer, already added by its code when it has one); for
    native-bias routers they are the router's scores of its logits.
    """
    if ranked_TE is None:
        return scores_to_probs(logits_TE, site.score_func) if site.score_func == "softmax" \
            else torch.sigmoid(logits_TE.float())
    ranked_TE = ranked_TE.reshape(logits_TE.shape[0], -1).float()
    if site.native_owner is not None:
        ranked_TE = ranked_TE - site.native_bias.detach().float().reshape(-1).to(ranked_TE.device)
    return ranked_TE


def _weights_index(output: tuple, logits: torch.Tensor, top_k: int) -> int | None:
    """The output that carries the gate weights: a floating tensor with grad that is not the raw
    logits (Llama 4 returns ``(scores, logits)``; most routers ``(logits, weights, indices)``),
    preferring one ``top_k`` wide."""
    candidates = [i for i, item in enumerate(output)
                  if isinstance(item, torch.Tensor) and item.is_floating_point() and item.requires_grad
                  and item.dim() >= 1 and item is not logits]
    if not candidates:
        return None
    k_wide = [i for i in candidates if output[i].shape[-1] == top_k]
    return (k_wide or candidates)[0]


def attach_to_output(site: RouterSite, output: Any, loss: torch.Tensor, logits: torch.Tensor,
                     weights_hint: int | None = None) -> Any:
    """Attach ``loss`` to the gate-weight output (the tensor the experts' combination uses)."""
    items = list(output) if isinstance(output, tuple) else [output]
    if site.attach_index is None:
        index = weights_hint if weights_hint is not None else _weights_index(tuple(items), logits, site.top_k)
        if index is None:
            raise RuntimeError(f"moe_balance: router {site.name} ({site.original_class.__name__}) returns no gate "
                               "weights with grad to attach the balance loss to; use attach_loss=False and add "
                               "balancer.loss() to your loss")
        site.attach_index = index
    index = site.attach_index
    items[index] = AttachLoss.apply(items[index], loss, site.state.backward_scale)
    return tuple(items) if isinstance(output, tuple) else items[0]


def _same(a: Any, b: Any) -> bool:
    """Bitwise equality of two router outputs (tensors, tuples, dicts and model outputs of them)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def check_parity(module: torch.nn.Module, site: RouterSite, args: tuple, kwargs: dict,
                 make_mode: Callable[[], SelectionInterceptor]) -> None:
    """Once, on a release the router is not verified on: its stock forward and its forward through the
    interception at a zero bias must agree bit for bit (same input, same random state). A mismatch is recorded
    for ``api.FirstForwardCheck``, which removes the patch and raises after the model's forward."""
    state = site.state
    state.parity_pending.discard(site.layer)
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    if any(t.device.type == "meta" for t in tensors):
        return
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    stock_forward = site.original_class.forward
    with torch.no_grad():
        with torch.random.fork_rng(devices=cuda):
            stock = stock_forward(module, *args, **kwargs)
        with torch.random.fork_rng(devices=cuda), make_mode():
            patched = stock_forward(module, *args, **kwargs)
    if not _same(stock, patched):
        state.parity_failures.append(site.name)


def _hidden_argument(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The router's own input when no ``F.linear`` call was seen (DeepSpeed ZeRO-3 replaces ``F.linear`` by its
    own autograd function): the first floating tensor argument; ``report`` checks its token count."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
    return None


class InterceptSelection:
    """Generic strategy: bias the router's own top-k call (see :mod:`.interception`)."""

    _mb_zero_is_masked = False
    _mb_argmax = False
    _mb_clone_logits = False

    def _mb_mode(self, site: RouterSite, zero_bias: bool = False) -> SelectionInterceptor:
        # A model's own bias buffer (MiniMax-M2, Ernie 4.5, ...) is already added by its code and kept in
        # sync with the master bias; adding ours on top would count it twice.
        uses_bias = site.state.balancer.config.uses_bias and site.native_owner is None
        bias_E = site.state.balancer.applied_bias(site.layer) if uses_bias else None
        if zero_bias and bias_E is not None:
            bias_E = torch.zeros_like(bias_E)
        return SelectionInterceptor(bias_E, site.num_experts, site.top_k, self._mb_zero_is_masked,
                                    self._mb_argmax, self._mb_clone_logits,
                                    logit_space=uses_bias and site.state.balancer.config.ranks_logits)

    def forward(self, *args, **kwargs):
        site: RouterSite = self.__dict__["_mb_site"]
        if site.layer in site.state.parity_pending:
            check_parity(self, site, args, kwargs, lambda: self._mb_mode(site, zero_bias=True))
        mode = self._mb_mode(site)
        with mode:
            output = super().forward(*args, **kwargs)
        if mode.intercepted == 0 or mode.indices is None:
            raise RuntimeError(
                f"moe_balance: router {site.name} ({site.original_class.__name__}) made no top-k call over "
                f"{site.num_experts} experts with k={site.top_k}; its routing is not supported by the generic "
                "strategy. Register an adapter with moe_balance.register_router.")
        if site.state.capture is not None:
            site.state.capture(site, mode.indices, mode.linear_call)
        logits = mode.logits
        if logits is None:
            logits = next(t for t in (output if isinstance(output, tuple) else (output,))
                          if isinstance(t, torch.Tensor) and t.shape[-1] == site.num_experts)
        # What the same weights choose without the bias (top-k routers): the routing a stock load would have.
        unbiased = mode.ranked.topk(site.top_k, dim=-1).indices \
            if mode.bias_E is not None and mode.ranked is not None and not self._mb_argmax else None
        router_input = mode.linear_call[0] if mode.linear_call is not None else _hidden_argument(args, kwargs)
        return report(site, logits, mode.indices, output, self._mb_dropped(output), self._mb_weights_index,
                      mode.ranked, router_input, unbiased)

    _mb_weights_index: int | None = None  # None: found from the output (see _weights_index)

    def _mb_dropped(self, output) -> torch.Tensor | None:
        return None


class InterceptGroupLimited(InterceptSelection):
    """Group-limited softmax routers (DeepSeek-V2): excluded groups are zeroed, keep them out."""

    _mb_zero_is_masked = True


class InterceptDeepSpeedGate(InterceptSelection):
    """``deepspeed.moe.sharded_moe.TopKGate``: top-1/top-2 choose by argmax, top-k by topk.

    Both picks are ranked in one space with one bias: probabilities (or, by default with quantile,
    log-probabilities) for the first expert and for top-k; top-2's second pick, which DeepSpeed takes
    over the noised logits, is read as the same probabilities with the first masked. Capacity and
    ``l_aux`` stay DeepSpeed's own; the share of assignments DeepSpeed dropped at capacity is reported as
    ``capacity_dropped``.
    Output: ``(l_aux, combine_weights, dispatch_mask, exp_counts)``.
    """

    _mb_argmax = True
    _mb_clone_logits = True
    _mb_weights_index = 1  # combine_weights; l_aux (index 0) reaches the loss only if the user adds it

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
        # records only: the model adds its own bias
        make_mode = functools.partial(SelectionInterceptor, None, site.num_experts, site.top_k)
        if site.layer in site.state.parity_pending:
            check_parity(self, site, args, kwargs, make_mode)
        mode = make_mode()
        with mode:
            output = super().forward(*args, **kwargs)
        # transformers >= 5.19 returns (logits, weights, indices); 4.57 (indices, weights) and the logits stay
        # inside; 5.6 routers return logits and the patched MoE block returns hidden states.
        items = output if isinstance(output, tuple) else (output,)
        tensors = [t for t in items if isinstance(t, torch.Tensor)]
        indices = next((t for t in tensors if not t.is_floating_point() and t.shape[-1] == site.top_k),
                       mode.selections[-1] if mode.selections else None)
        logits = next((t for t in tensors if t.is_floating_point() and t.shape[-1] == site.num_experts), mode.logits)
        if indices is None or logits is None:
            raise RuntimeError(f"moe_balance: router {site.name} ({site.original_class.__name__}) showed no top-"
                               f"{site.top_k} selection over {site.num_experts} experts (or no logits); register "
                               "an adapter with moe_balance.register_router")
        if site.state.capture is not None:
            site.state.capture(site, indices, None)
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
        with gathered([site.native_bias for site in self.sites], modify=True):
            for site in self.sites:
                write_native(site.native_bias, balancer.bias_LE[site.layer])


@functools.cache
def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5: no public DTensor, no FSDP2 to shard a bias either
        return None
    return DTensor


def _is_dtensor(tensor: torch.Tensor) -> bool:
    # Looked up once: the import statement costs ~0.3 s per call here (the step's fold asks once per router).
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def is_sharded(tensor: torch.Tensor) -> bool:
    """An FSDP2 DTensor (the parameter or its data) or a ZeRO-3 partitioned parameter."""
    return _is_dtensor(tensor) or _is_dtensor(tensor.data) or hasattr(tensor, "ds_id")


def read_native(tensor: torch.Tensor) -> torch.Tensor:
    """The whole native bias as a plain tensor. FSDP2 shards a bias that is an ``nn.Parameter`` (Ernie 4.5,
    AFMoE, Laguna) into a DTensor: it is all-gathered, a collective (every rank patches in the same order)."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


@torch.no_grad()
def write_native(buf: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the full ``value`` into the native bias ``buf``, in its dtype. An FSDP2 shard (DTensor) takes
    its own slice, without communication: every rank holds the same master bias after the step's all-reduce."""
    full = value.reshape(buf.shape).to(device=buf.device, dtype=buf.dtype)
    if _is_dtensor(buf):
        from torch.distributed.tensor import distribute_tensor
        full = distribute_tensor(full, buf.device_mesh, buf.placements, src_data_rank=None)
    buf.copy_(full)


def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape of ``tensor``, or of the whole parameter when ZeRO-3 partitioned it (its ``.shape``
    is then ``[0]`` outside the engine's forward; ``ds_shape`` holds the full one)."""
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


@contextmanager
def gathered(tensors: list[torch.Tensor], modify: bool = False) -> Iterator[None]:
    """Make ZeRO-3 partitioned parameters among ``tensors`` whole for the block (a no-op for others).

    AFMoE keeps its selection bias as a frozen ``nn.Parameter``, which ZeRO-3 partitions like any
    weight. A collective: every rank of the parameters' group must enter it in the same order. With
    ``modify``, rank 0's values are broadcast and re-partitioned on exit (every rank holds the same
    master bias after the step's all-reduce, so this changes nothing but the shards).
    """
    partitioned = [t for t in tensors if hasattr(t, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield


NATIVE_BIAS_NAMES = ("e_score_correction_bias", "expert_bias")


def find_native_bias(router: torch.nn.Module, parent: torch.nn.Module | None,
                     num_experts: int) -> tuple[torch.nn.Module, str] | None:
    """The model's own selection-bias tensor for this router: on the router, a child of it
    (Ernie 4.5's ``moe_statics``) or the MoE block that passes it in (MiniMax-M2, AFMoE, LFM2-MoE)."""
    owners = [router, *router.children()] + ([parent] if parent is not None else [])
    for owner in owners:
        for attr in NATIVE_BIAS_NAMES:
            value = getattr(owner, attr, None)
            shape = full_shape(value) if isinstance(value, torch.Tensor) else ()
            if len(shape) >= 1 and math.prod(shape) == num_experts and shape[-1] == num_experts:
                return owner, attr
    return None


def _first_int_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        ids = args[0]  # model(input_ids) positionally
    return ids if isinstance(ids, torch.Tensor) else None


class BatchInfoHook:
    """Forward pre-hook on the top-level model: routers see neither the attention mask nor where
    sequences start, so keep both (by keyword; a positional 2nd argument may be anything)."""

    def __init__(self, state: PatchState) -> None:
        self.state = state

    def __call__(self, module, args, kwargs):
        ids = _first_int_tensor(args, kwargs)
        embeds = kwargs.get("inputs_embeds")
        shape = None
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            shape = tuple(ids.shape)
        elif isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
            shape = tuple(embeds.shape[:2])
        mask = kwargs.get("attention_mask")
        positions = kwargs.get("position_ids")
        if isinstance(positions, torch.Tensor) and positions.dim() == 3:  # multimodal RoPE: [3, B, S]
            positions = positions[0]
        cu_seqlens = kwargs.get("cu_seq_lens_q", kwargs.get("cu_seqlens_q"))
        self.state.batch = BatchInfo(
            shape_BS=shape,
            mask_BS=mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None,
            position_ids_BS=positions if isinstance(positions, torch.Tensor) and positions.dim() == 2
            and shape is not None and tuple(positions.shape) == shape else None,
            cu_seqlens=cu_seqlens if isinstance(cu_seqlens, torch.Tensor) else None)


STRATEGIES: dict[str, type] = {
    "generic": InterceptSelection,
    "group_limited": InterceptGroupLimited,
    "native_bias": NativeCorrectionBias,
    "deepspeed_gate": InterceptDeepSpeedGate,
}
