"""`Balancer`: the stateful object every integration drives.

Data flow per optimizer step:

1. for every micro-batch and MoE layer, ``observe`` takes the router's own logits, the experts it
   really chose and the token mask; it adds counts into the step window (``index_add_``, no host
   sync) and returns that layer's weighted balance loss;
2. ``loss()`` hands back the sum of the losses observed since the last call (for loops that add
   it to their own loss); adapters may instead attach each layer's loss to the router output;
3. ``step()`` after each *applied* optimizer step: ONE all-reduce of every window statistic
   stacked into a single tensor, then the bias update, the global-batch load fractions for the
   next step, the adaptive weight, and a fresh window.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from . import stats
from .adaptive import AdaptiveCoef
from .bias import SHADOW_GAINS, BiasController
from .config import BalanceConfig, resolve_config, resolved_bias_space
from .distributed import StepReducer
from .fold import cg_step, input_statistics
from .quantile import margin_histogram
from .losses import RoutingBatch, aux_loss, scores_to_probs, segments_from_seq_len, z_loss

# Window statistics, in the order they are stacked for the all-reduce: name -> per-layer width
# (None = number of experts, "C" = number of capacity factors).
_WINDOW_FIELDS: tuple[tuple[str, Any], ...] = (
    ("counts_LE", None),         # assignments per expert over the window
    ("tokens_L", 1),             # valid tokens routed
    ("batch_maxvio_sum_L", 1),   # sum over micro-batches of that micro-batch's MaxVio
    ("batches_L", 1),            # micro-batches that had at least one valid token
    ("dropped_sum_LC", "C"),     # sum over micro-batches of the dropped share per capacity factor
    ("skipped_tokens_L", 1),     # tokens excluded for non-finite logits
    ("aux_sum_L", 1),            # sum of the unweighted aux loss values
    ("z_sum_L", 1),              # sum of the unweighted z-loss values
    ("loss_batches_L", 1),       # micro-batches whose losses were computed
    ("reported_dropped_sum_L", 1),  # dropped share reported by a router with its own capacity (DeepSpeed)
    ("reported_batches_L", 1),
    ("differ_L", 1),             # valid tokens whose chosen experts differ from the unbiased top-k (generic routers)
)
# With the online fold (moe_balance.fold): sums over the router inputs of the real tokens.
_FOLD_FIELDS: tuple[tuple[str, Any], ...] = (
    ("fold_sums_L3D", "3D"),     # sum x, sum x (x . v), sum x (x . p)
    ("fold_scalars_L2", 2),      # tokens, sum |x|^2
)


class Balancer(nn.Module):
    """Collects router loads, computes balance losses and runs the loss-free bias controller.

    Args:
        config: a :class:`BalanceConfig`, a dict of its fields, or None (defaults) plus keywords.
        num_layers: number of MoE layers (``L``); layer indices passed to ``observe`` are 0..L-1.
        num_experts: routed experts per layer (``E``).
        top_k: experts chosen per token (``K``).
        process_group: the data-parallel group whose counts are summed (default: WORLD).
        router_dim: width ``D`` of the router inputs; with it (and ``fold_share > 0``) the balancer estimates
            the fold direction online (:mod:`moe_balance.fold`). Patching passes it.

    Example:
        >>> import torch, moe_balance as mb
        >>> bal = mb.Balancer(mb.BalanceConfig(aux_loss="switch"), num_layers=1, num_experts=4, top_k=2)
        >>> logits_TE = torch.randn(16, 4, requires_grad=True)
        >>> probs_TE = logits_TE.softmax(-1)  # what this router ranks: top_k(probs + bias)
        >>> idx_TK = (probs_TE.detach() + bal.bias_LE[0]).topk(2).indices
        >>> _ = bal.observe(0, logits_TE, idx_TK, selection_scores=probs_TE)
        >>> bal.loss().backward(); bal.step()
        >>> sorted(bal.metrics())[:2]
        ['aux_coef', 'aux_loss']
    """

    def __init__(self, config: BalanceConfig | Mapping[str, Any] | None = None, *, num_layers: int,
                 num_experts: int, top_k: int, process_group: object | None = None,
                 router_dim: int | None = None, **overrides: Any) -> None:
        super().__init__()
        for name, value in (("num_layers", num_layers), ("num_experts", num_experts), ("top_k", top_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Balancer {name}={value!r} must be a positive integer")
        if top_k > num_experts:
            raise ValueError(f"Balancer top_k={top_k} must be <= num_experts={num_experts}")
        self.config = resolve_config(config, **overrides)
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        L, E = num_layers, num_experts
        self.register_buffer("bias_LE", torch.zeros(L, E, dtype=torch.float32))
        self.register_buffer("ema_LE", torch.zeros(L, E, dtype=torch.float64))
        # Load fractions of the last global window, scaled to mean 1; uniform before any step,
        # which makes the global-batch loss flat (no push) until loads have been measured.
        self.register_buffer("global_f_LE", torch.ones(L, E, dtype=torch.float32))
        self.register_buffer("aux_coef", torch.tensor(float(self.config.aux_loss_coef), dtype=torch.float32))
        # The quantile rule adds its margin histograms to the one all-reduce (see moe_balance.quantile).
        self._window_fields = _WINDOW_FIELDS + ((("quantile_hist_LEB", "H"),) if self.config.uses_quantile else ())
        if router_dim is not None and (isinstance(router_dim, bool) or not isinstance(router_dim, int)
                                       or router_dim < 1):
            raise ValueError(f"Balancer router_dim={router_dim!r} must be a positive integer or None")
        self.router_dim = router_dim if self.config.fold_share_resolved > 0 else None
        if self.router_dim is not None:
            self._window_fields += _FOLD_FIELDS
            # CG iterate v ~ S^-1 mu and search direction p per layer; a = v / (mu . v) is the fold direction.
            self.register_buffer("fold_v_LD", torch.zeros(L, self.router_dim, dtype=torch.float64))
            self.register_buffer("fold_p_LD", torch.zeros(L, self.router_dim, dtype=torch.float64))
            self.register_buffer("fold_a_LD", torch.zeros(L, self.router_dim, dtype=torch.float64))
            self.register_buffer("fold_fit_L", torch.zeros(L, dtype=torch.float64))
            # the last step's input mean: what a weight edit shifts the logits by on average is ``edit @ mu``
            self.register_buffer("fold_mu_LD", torch.zeros(L, self.router_dim, dtype=torch.float64))
            # per layer: has the fold run (its fit reached fold.MIN_FIT once)? From then on it runs at every step
            self.register_buffer("fold_started_L", torch.zeros(L, dtype=torch.bool))
        for name, width in self._window_fields:
            self.register_buffer(name, torch.zeros(self._window_shape(width), dtype=torch.float64),
                                 persistent=True)
        self.register_buffer("quantile_range_L", torch.ones(L, dtype=torch.float64))
        self.register_buffer("last_delta_sign_LE", torch.zeros(L, E, dtype=torch.int8))
        # quantile_step="filtered": per shadow filter, its price estimate and recent squared miss (always kept, so
        # a state resumes whichever step the config chooses)
        self.register_buffer("quantile_shadow_GLE", torch.zeros(len(SHADOW_GAINS), L, E, dtype=torch.float64))
        self.register_buffer("quantile_shadow_error_GL", torch.zeros(len(SHADOW_GAINS), L, dtype=torch.float64))
        if self.config.expert_parallel_size > 1 and E % self.config.expert_parallel_size:
            raise ValueError(f"BalanceConfig.expert_parallel_size={self.config.expert_parallel_size} must divide "
                             f"num_experts={E}")
        if self.config.uses_quantile and top_k >= num_experts:
            raise ValueError(f"bias_update='quantile' needs top_k < num_experts (got top_k={top_k}, "
                             f"num_experts={num_experts}): a token's cutoff is its (k+1)-th score")
        self.num_steps = 0
        self._has_ema = False
        self._home_checked = False  # see _follow
        self.window_index = 0  # counts window resets (patch adapters key per-window bookkeeping on it)
        self.is_measuring = False  # inside measuring(): eval forwards are recorded too
        self._adaptive = AdaptiveCoef(self.config)
        self.aux_coef.fill_(self._adaptive.coef)
        self._bias = BiasController(self.config, self.bias_LE, self.ema_LE, self.last_delta_sign_LE,
                                    self.quantile_range_L, self.quantile_shadow_GLE, self.quantile_shadow_error_GL)
        self.reducer = StepReducer(process_group)
        self._pending: list[torch.Tensor] = []
        self.last_window: dict[str, torch.Tensor] | None = None
        # Called after each bias update and state load (adapters copy the bias into native buffers).
        self.step_callbacks: list[Any] = []
        # Called after each bias update only, before step_callbacks (the online fold edits router weights).
        self.post_step_hooks: list[Any] = []
        # the largest logit shift the online fold moved into the weights at the last step (set by its hook)
        self.fold_moved_abs_max: torch.Tensor | None = None

    def _window_shape(self, width: Any) -> tuple[int, ...]:
        if width is None:
            return (self.num_layers, self.num_experts)
        if width == "C":
            return (self.num_layers, len(self.config.capacity_factors))
        if width == "H":
            return (self.num_layers, self.num_experts, self.config.quantile_bins + 2)
        if width == "3D":
            return (self.num_layers, 3, self.router_dim)
        if isinstance(width, int) and width > 1:
            return (self.num_layers, width)
        return (self.num_layers,)

    # ------------------------------------------------------------------ device
    def _follow(self, device: torch.device) -> None:
        """Keep the state where the routers run.

        Engines move a model after it was patched (the HF Trainer leaves placement to DeepSpeed, FSDP
        or ``device_map``; ``deepspeed.initialize`` moves the module). The first router call of a
        window decides the balancer's home, so the step's all-reduce runs on the routers' device
        (NCCL needs CUDA tensors); routers elsewhere (``device_map`` over several GPUs) send their
        counts home and read the bias from it.
        """
        if self._home_checked:
            return
        self._home_checked = True
        if device != self.bias_LE.device:
            self.to(device)

    # ------------------------------------------------------------------ observe
    def observe(self, layer: int, router_logits: torch.Tensor, topk_idx: torch.Tensor,
                mask: torch.Tensor | None = None, *, scores: torch.Tensor | None = None,
                seq_len: int | None = None, segment_ids: torch.Tensor | None = None,
                selection_scores: torch.Tensor | None = None, collect: bool = True, record: bool = True,
                dropped: torch.Tensor | None = None, router_input: torch.Tensor | None = None,
                unbiased_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Record one micro-batch of one layer; return its weighted balance loss (0-d tensor).

        Args:
            layer: MoE layer index in ``[0, num_layers)``.
            router_logits: ``[T, E]`` or ``[B, S, E]`` raw router logits (with grad for losses).
            topk_idx: ``[T, K]`` (or ``[B, S, K]``) experts actually chosen, after any bias.
            mask: ``[T]`` or ``[B, S]``, true/1 for real tokens; padding is excluded exactly.
            scores: the router's own scores (e.g. sigmoid affinities) if not ``score_func(logits)``.
            seq_len: tokens per sequence when ``T = B * S`` (the ``seq`` loss needs sequence boundaries).
            segment_ids: ``[T]`` integer id of the sequence each token belongs to, ids in ``[0, T)``, for
                packed batches (several sequences per row); overrides ``seq_len``.
            selection_scores: ``[T, E]`` the unbiased scores the router ranks (``top_k(scores + bias)``);
                needed by ``bias_update="quantile"``.
            collect: also keep the loss for ``loss()``; adapters that attach it themselves pass False.
            record: add to the step window; False only computes the loss (e.g. a gradient-checkpoint
                recomputation, whose tokens were already counted in the first forward).
            dropped: share of assignments the router itself dropped at capacity (0-d tensor), if it has one.
            router_input: ``[T, D]`` the router's linear input, for the online fold's statistics (``router_dim``).
            unbiased_idx: ``[T, K]`` the experts the router would choose without the bias; counted in
                ``routing_differ`` (the share of tokens a stock load of the current weights would route otherwise).
        """
        logits_TE, idx_TK, mask_T, scores_TE, segments = self._check(layer, router_logits, topk_idx,
                                                                    mask, scores, seq_len, segment_ids)
        self._follow(logits_TE.device)
        # A row sum is non-finite iff a row holds NaN/Inf (or overflows, itself a broken router):
        # ~30x cheaper than isfinite(x).all(-1) on [8192, 256].
        finite_T = torch.isfinite(logits_TE.sum(-1))
        if scores_TE is not None:
            finite_T = finite_T & torch.isfinite(scores_TE.sum(-1))
        valid_T = finite_T if mask_T is None else finite_T & mask_T.bool()
        weight_T = valid_T.to(torch.float64)
        # This micro-batch's expert counts, shared by the step window and the aux loss.
        counts_E = torch.zeros(self.num_experts, dtype=torch.float64, device=weight_T.device)
        counts_E.index_add_(0, idx_TK.reshape(-1).long(),
                            weight_T[:, None].expand(-1, idx_TK.shape[1]).reshape(-1))
        if record:
            home = self.bias_LE.device  # routers on other devices (device_map) send their counts home
            self._count(layer, counts_E.to(home, non_blocking=True), idx_TK.shape[1], weight_T.to(home),
                        None if mask_T is None else mask_T.to(home), finite_T.to(home))
            if dropped is not None:
                self.reported_dropped_sum_L[layer] += dropped.detach().to(home, torch.float64)
                self.reported_batches_L[layer] += 1
            if self.config.uses_quantile and not self.is_measuring:  # prices need them, measuring windows do not
                self._add_margins(layer, logits_TE, selection_scores, weight_T)
            if self.router_dim is not None and router_input is not None and not self.is_measuring:
                self._add_inputs(layer, router_input, weight_T)
            if unbiased_idx is not None:
                self.differ_L[layer] += _differ_count(idx_TK, unbiased_idx.reshape(idx_TK.shape[0], -1),
                                                      self.num_experts, weight_T).to(home)
        if not self.config.uses_loss or not torch.is_grad_enabled():
            return logits_TE.new_zeros((), dtype=torch.float32)
        total = self._losses(layer, logits_TE, idx_TK, counts_E, weight_T.float(), finite_T, scores_TE, segments,
                             record)
        if collect:
            self._pending.append(total)
        return total

    def _add_margins(self, layer: int, logits_TE: torch.Tensor, selection_scores: torch.Tensor | None,
                     weight_T: torch.Tensor) -> None:
        if selection_scores is None:
            raise ValueError("observe: bias_update='quantile' needs selection_scores= (the unbiased scores the "
                             "router ranks with top_k(scores + bias)); patched models pass them")
        scores_TE = selection_scores.detach().reshape(logits_TE.shape[0], self.num_experts)
        home = self.bias_LE.device
        hist_EB = margin_histogram(scores_TE, self.bias_LE[layer].to(scores_TE.device), weight_T, self.top_k,
                                   self.quantile_range_L[layer].to(scores_TE.device), self.config.quantile_bins)
        self.quantile_hist_LEB[layer] += hist_EB.to(home, non_blocking=True)

    def _add_inputs(self, layer: int, router_input: torch.Tensor, weight_T: torch.Tensor) -> None:
        x_TD = router_input.detach().reshape(-1, router_input.shape[-1])
        if x_TD.shape != (weight_T.shape[0], self.router_dim):
            raise ValueError(f"observe: router_input shape {tuple(router_input.shape)} must hold "
                             f"[T={weight_T.shape[0]}, router_dim={self.router_dim}]")
        home = self.bias_LE.device
        sums_3D, scalars_2 = input_statistics(x_TD, weight_T.to(x_TD.device), self.fold_v_LD[layer],
                                              self.fold_p_LD[layer])
        self.fold_sums_L3D[layer] += sums_3D.to(home, non_blocking=True)
        self.fold_scalars_L2[layer] += scalars_2.to(home, non_blocking=True)

    def _check(self, layer: int, logits: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor | None,
               scores: torch.Tensor | None, seq_len: int | None, segment_ids: torch.Tensor | None):
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise IndexError(f"observe: layer={layer!r} out of range [0, {self.num_layers})")
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            got = getattr(logits, "dtype", type(logits))
            raise TypeError(f"observe: router_logits must be a floating tensor, got {got}")
        if logits.dim() == 3:
            seq_len = seq_len or logits.shape[1]
            logits = logits.reshape(-1, logits.shape[-1])
        if logits.dim() != 2 or logits.shape[-1] != self.num_experts:
            raise ValueError(f"observe: router_logits shape {tuple(logits.shape)} must be [T, {self.num_experts}] "
                             f"or [B, S, {self.num_experts}]")
        T = logits.shape[0]
        if idx.is_floating_point() or idx.dtype == torch.bool:
            raise TypeError(f"observe: topk_idx must be an integer tensor, got {idx.dtype}")
        if idx.dim() == 1:
            idx = idx[:, None]
        elif idx.dim() == 3:
            idx = idx.reshape(-1, idx.shape[-1])
        if idx.dim() != 2 or idx.shape[0] != T or not 1 <= idx.shape[1] <= self.num_experts:
            raise ValueError(f"observe: topk_idx shape {tuple(idx.shape)} must be [T={T}, K]")
        if mask is not None:
            if mask.numel() != T:
                raise ValueError(f"observe: mask has {mask.numel()} elements, router_logits has T={T} tokens")
            mask = mask.reshape(T)
        if scores is not None:
            scores = scores.reshape(T, -1)
            if scores.shape[-1] != self.num_experts:
                raise ValueError(f"observe: scores shape {tuple(scores.shape)} must be [T, {self.num_experts}]")
        if seq_len is not None and (seq_len < 1 or T % seq_len):
            raise ValueError(f"observe: seq_len={seq_len} does not divide T={T}")
        segments = self._segments(T, seq_len, segment_ids, logits.device)
        return logits, idx, mask, scores, segments

    def _segments(self, T: int, seq_len: int | None, segment_ids: torch.Tensor | None,
                  device: torch.device) -> tuple[torch.Tensor, int] | None:
        """``(segment_T, num_segments)`` for the sequence-wise loss; it refuses to guess."""
        if segment_ids is not None:
            if segment_ids.numel() != T or segment_ids.is_floating_point():
                raise ValueError(f"observe: segment_ids must be {T} integers (one per token), got "
                                 f"{segment_ids.dtype} with {segment_ids.numel()} elements")
            if self.config.aux_loss != "seq":
                return None
            return segment_ids.reshape(T).to(device=device, dtype=torch.long), T  # T bounds the count: no sync
        if self.config.aux_loss != "seq":
            return None
        if seq_len is None:
            raise ValueError("observe: aux_loss='seq' needs sequence boundaries: pass [B, S, E] logits, seq_len= "
                             "or segment_ids= (patched models take them from input_ids/position_ids)")
        return segments_from_seq_len(T, seq_len, device)

    def _count(self, layer: int, counts_E: torch.Tensor, K: int, weight_T: torch.Tensor,
               mask_T: torch.Tensor | None, finite_T: torch.Tensor) -> None:
        n_valid = weight_T.sum()
        has_tokens = (n_valid > 0).to(torch.float64)
        self.counts_LE[layer] += counts_E
        self.tokens_L[layer] += n_valid
        batch_mv = stats.maxvio(counts_E[None])[0]
        self.batch_maxvio_sum_L[layer] += batch_mv * has_tokens
        self.batches_L[layer] += has_tokens
        n_assign = n_valid * K
        for c, cf in enumerate(self.config.capacity_factors):
            self.dropped_sum_LC[layer, c] += stats.dropped_fraction(counts_E, n_assign, cf) * has_tokens
        real_T = torch.ones_like(finite_T) if mask_T is None else mask_T.bool()
        self.skipped_tokens_L[layer] += (real_T & ~finite_T).sum().to(torch.float64)

    def _losses(self, layer: int, logits_TE: torch.Tensor, idx_TK: torch.Tensor, counts_E: torch.Tensor,
                weight_T: torch.Tensor, finite_T: torch.Tensor, scores_TE: torch.Tensor | None,
                segments: tuple[torch.Tensor, int] | None, record: bool) -> torch.Tensor:
        """The layer's weighted loss, on the router's device; only the recorded values go home."""
        cfg = self.config
        # Zero out non-finite rows *before* any math so no NaN reaches the backward pass.
        safe_logits = torch.where(finite_T[:, None], logits_TE, torch.zeros_like(logits_TE))
        safe_scores = None if scores_TE is None else torch.where(finite_T[:, None], scores_TE,
                                                                  torch.zeros_like(scores_TE))
        device, home = logits_TE.device, self.bias_LE.device
        total = safe_logits.new_zeros((), dtype=torch.float32)
        counted = (weight_T.sum() > 0).to(home, torch.float64) * float(record)
        if cfg.uses_aux:
            probs_TE = scores_to_probs(safe_logits, cfg.score_func, safe_scores)
            segment_T, num_segments = segments if segments is not None else (None, None)
            batch = RoutingBatch(safe_logits, probs_TE, weight_T, counts_E.float(), idx_TK, self.top_k,
                                 segment_T, num_segments, self.global_f_LE[layer].to(device))
            aux = aux_loss(cfg.aux_loss, batch)
            self.aux_sum_L[layer] += aux.detach().to(home, torch.float64) * counted
            total = total + self.aux_coef.to(device) * aux
        if cfg.z_loss_coef > 0:
            z = z_loss(safe_logits, weight_T)
            self.z_sum_L[layer] += z.detach().to(home, torch.float64) * counted
            total = total + cfg.z_loss_coef * z
        self.loss_batches_L[layer] += counted
        return total

    def loss(self) -> torch.Tensor:
        """Sum of the weighted balance losses observed since the last call (0 if none)."""
        pending, self._pending = self._pending, []
        if not pending:
            return self.bias_LE.new_zeros(())
        return torch.stack([p.reshape(()) for p in pending]).sum()

    # --------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, update_bias: bool = True) -> None:
        """Close the step window: one all-reduce, then bias / global-f / adaptive-weight updates.

        Call once per *applied* optimizer step (skip it when the optimizer skipped the step).
        ``update_bias=False`` only measures (evaluation): the window is reduced and reset.
        """
        if self._pending:
            warnings.warn(f"moe_balance: {len(self._pending)} balance losses were computed but never taken with "
                          "loss(); add balancer.loss() to your loss or patch with attach_loss=True",
                          RuntimeWarning, stacklevel=2)
        window = self._reduce_window()
        self._reset_window()
        self._pending = []
        self.last_window = window
        skipped = float(window["skipped_tokens_L"].sum())
        if skipped:
            message = (f"moe_balance: {int(skipped)} routed tokens had non-finite router logits this step "
                       "and were excluded from counts and losses")
            if self.config.nan_policy == "raise":
                raise FloatingPointError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        if not update_bias:
            return
        counts_LE = window["counts_LE"]
        if self.config.uses_quantile:
            capacity_L = (window["tokens_L"] * self.top_k / self.num_experts).ceil()
            self._bias.update_quantile(window["quantile_hist_LEB"], capacity_L, self.num_steps)
        else:
            self._has_ema = self._bias.update(counts_LE, self.num_steps, self._has_ema)
        totals_L1 = counts_LE.sum(-1, keepdim=True)
        f_LE = counts_LE * (self.num_experts / totals_L1.clamp_min(1.0))
        self.global_f_LE.copy_(torch.where(totals_L1 > 0, f_LE, self.global_f_LE.double()).float())
        active = window["tokens_L"] > 0
        if bool(active.any()):
            mean_maxvio = float(stats.maxvio(counts_LE)[active].mean())
            self.aux_coef.fill_(self._adaptive.update(mean_maxvio))
        if self.router_dim is not None:
            sums_L3D, scalars_L2 = window["fold_sums_L3D"], window["fold_scalars_L2"]
            self.fold_a_LD, self.fold_fit_L = (t.to(self.fold_a_LD) for t in cg_step(
                self.fold_v_LD, self.fold_p_LD, sums_L3D, scalars_L2))
            tokens_L1 = scalars_L2[:, :1].to(self.fold_mu_LD)
            mean_LD = sums_L3D[:, 0].to(self.fold_mu_LD) / tokens_L1.clamp_min(1.0)
            self.fold_mu_LD.copy_(torch.where(tokens_L1 > 0, mean_LD, self.fold_mu_LD))
        self.num_steps += 1
        for hook in self.post_step_hooks:
            hook(self)
        for callback in self.step_callbacks:
            callback(self)

    def applied_bias(self, layer: int) -> torch.Tensor:
        """The bias a generic router adds to its selection now (what the fold has not moved into its weights)."""
        return self.bias_LE[layer]

    def _reduce_window(self) -> dict[str, torch.Tensor]:
        parts = [getattr(self, name) for name, _ in self._window_fields]
        reduced = self.reducer.sum_parts(parts)
        return {name: part.clone() for (name, _), part in zip(self._window_fields, reduced)}

    def _reset_window(self) -> None:
        for name, _ in self._window_fields:
            getattr(self, name).zero_()
        self._home_checked = False
        self.window_index += 1

    def reset_window(self) -> None:
        """Drop what was observed since the last step (e.g. after an aborted micro-batch)."""
        self._reset_window()
        self._pending = []

    @contextmanager
    def measuring(self) -> Iterator[Balancer]:
        """Measure balance (e.g. on an eval set) without touching the bias or the train window.

        Example:
            >>> import torch, moe_balance as mb
            >>> bal = mb.Balancer(num_layers=1, num_experts=4, top_k=1, bias_update="sign")
            >>> with bal.measuring():
            ...     _ = bal.observe(0, torch.randn(8, 4), torch.zeros(8, 1, dtype=torch.long))
            >>> bal.last_window["counts_LE"].tolist()
            [[8.0, 0.0, 0.0, 0.0]]
        """
        saved = {name: getattr(self, name).clone() for name, _ in _WINDOW_FIELDS}
        saved_pending, saved_index = self._pending, self.window_index
        self._reset_window()
        self._pending = []
        self.is_measuring = True
        try:
            yield self
            self.step(update_bias=False)
        finally:
            self.is_measuring = False
            for name, value in saved.items():
                getattr(self, name).copy_(value.to(getattr(self, name).device))
            self._pending = saved_pending
            self.window_index = saved_index

    # ------------------------------------------------------------------ metrics
    def current_window(self) -> dict[str, torch.Tensor]:
        """This rank's window so far (not reduced)."""
        return {name: getattr(self, name).clone() for name, _ in _WINDOW_FIELDS}

    def metrics(self, per_layer: bool | None = None) -> dict[str, float]:
        """Balance metrics of the last completed window (or the open one before any step).

        Keys: ``maxvio_global`` (window), ``maxvio_batch`` (mean over micro-batches), ``cv``,
        ``load_entropy``, ``dead_experts``, ``min_max_ratio``, ``dropped@<cf>``, ``bias_abs_mean``,
        ``bias_abs_max``, ``aux_loss``, ``z_loss``, ``aux_coef``, ``tokens``, ``skipped_tokens``;
        controller metrics ``bias_flip_share`` (experts whose bias move reversed direction this step) and, for
        ``quantile_step="filtered"``, ``bias_step_share`` (mean over layers of the share of the price move applied),
        ``maxvio_layer_median/p95/max`` and ``maxvio_worst_layer``; ``routing_differ`` (share of tokens whose
        experts differ from what the same weights choose without the bias: what a stock load would change) and,
        with the online fold, ``fold_fit`` (mean over layers of the share of a constant the router inputs
        explain) and ``fold_moved_abs_max`` (largest per-expert logit shift moved into the weights at the last
        step); with ``expert_parallel_size > 1`` ``ep_imbalance`` (busiest expert-parallel rank's load over
        the mean, minus 1, mean over layers) and ``ep_imbalance_max``; with ``per_layer`` also ``layer<i>/<name>``.
        """
        window = self.last_window if self.last_window is not None else self.current_window()
        per_layer = self.config.log_per_layer if per_layer is None else per_layer
        active_L = window["tokens_L"] > 0
        summary = stats.summarize(window["counts_LE"])
        batches_L = window["batches_L"].clamp_min(1.0)
        summary["maxvio_batch"] = window["batch_maxvio_sum_L"] / batches_L
        for c, cf in enumerate(self.config.capacity_factors):
            summary[f"dropped@{cf:g}"] = window["dropped_sum_LC"][:, c] / batches_L
        loss_batches_L = window["loss_batches_L"].clamp_min(1.0)
        out: dict[str, float] = {}

        def layer_mean(values_L: torch.Tensor) -> float:
            return float(values_L[active_L].mean()) if bool(active_L.any()) else 0.0

        for name, values_L in summary.items():
            key = "maxvio_global" if name == "maxvio" else name
            out[key] = layer_mean(values_L)
            if per_layer:
                for layer in range(self.num_layers):
                    out[f"layer{layer}/{key}"] = float(values_L[layer])
        out["dead_experts"] = float(summary["dead_experts"][active_L].sum()) if bool(active_L.any()) else 0.0
        bias_abs = self.bias_LE.abs()
        out["bias_abs_mean"] = float(bias_abs.mean())
        out["bias_abs_max"] = float(bias_abs.max())
        out["aux_loss"] = float((window["aux_sum_L"] / loss_batches_L).sum())
        out["z_loss"] = float((window["z_sum_L"] / loss_batches_L).sum())
        out["aux_coef"] = float(self.aux_coef)
        out["tokens"] = float(window["tokens_L"].max())
        out["skipped_tokens"] = float(window["skipped_tokens_L"].sum())
        out["routing_differ"] = layer_mean(window["differ_L"] / window["tokens_L"].clamp_min(1.0))
        if self.router_dim is not None:
            out["fold_fit"] = float(self.fold_fit_L.mean())
            moved = self.fold_moved_abs_max
            out["fold_moved_abs_max"] = float(moved) if moved is not None else 0.0
        out.update(self._controller_metrics(window["counts_LE"], active_L))
        reported_L = window["reported_batches_L"]
        if bool((reported_L > 0).any()):
            has = reported_L > 0
            out["capacity_dropped"] = float((window["reported_dropped_sum_L"][has] / reported_L[has]).mean())
        return dict(sorted(out.items()))

    def _controller_metrics(self, counts_LE: torch.Tensor, active_L: torch.Tensor) -> dict[str, float]:
        """What long runs watch: oscillation, the spread of balance over layers, the busiest EP rank."""
        out = {"bias_flip_share": self._bias.flip_share}
        if self._bias.step_share is not None:
            out["bias_step_share"] = float(self._bias.step_share.mean())
        if bool(active_L.any()):
            maxvio_L = stats.maxvio(counts_LE)[active_L].double()
            out["maxvio_layer_median"] = float(maxvio_L.median())
            out["maxvio_layer_p95"] = float(torch.quantile(maxvio_L, 0.95))
            out["maxvio_layer_max"] = float(maxvio_L.max())
            out["maxvio_worst_layer"] = float(torch.nonzero(active_L).reshape(-1)[maxvio_L.argmax()])
            ranks = self.config.expert_parallel_size
            if ranks > 1:
                per_rank_LN = counts_LE[active_L].reshape(-1, ranks, self.num_experts // ranks).sum(-1)
                excess_L = per_rank_LN.amax(-1) / per_rank_LN.mean(-1).clamp_min(1e-12) - 1.0
                out["ep_imbalance"] = float(excess_L.mean())
                out["ep_imbalance_max"] = float(excess_L.max())
        return out

    def load_matrix(self) -> torch.Tensor:
        """The ``[L, E]`` expert counts of the last completed window (or the open one)."""
        window = self.last_window if self.last_window is not None else self.current_window()
        return window["counts_LE"].clone()

    def export_loads(self, path: str | Path) -> Path:
        """Write the load matrix as ``.npy`` (NumPy needed) or JSON (any other suffix)."""
        path = Path(path)
        loads = self.load_matrix()
        if path.suffix == ".npy":
            import numpy as np
            np.save(path, loads.numpy())
        else:
            path.write_text(json.dumps({"step": self.num_steps, "counts_LE": loads.tolist()}))
        return path

    # -------------------------------------------------------------------- state
    def get_extra_state(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, "has_ema": self._has_ema, "adaptive_coef": self._adaptive.coef,
                "config": self.config.to_dict(), "shape": [self.num_layers, self.num_experts, self.top_k]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        shape = list(state.get("shape", []))
        if shape != [self.num_layers, self.num_experts, self.top_k]:
            raise ValueError(f"Balancer state is for [layers, experts, top_k]={shape}, this balancer is "
                             f"{[self.num_layers, self.num_experts, self.top_k]}")
        saved = state.get("config") or {}
        # states from before bias_space existed kept the bias on the router's scores
        saved_space = resolved_bias_space(saved.get("bias_update", "none"), saved.get("bias_space", "scores"))
        own_space = resolved_bias_space(self.config.bias_update, self.config.bias_space)
        if saved.get("bias_update", "none") != "none" and saved_space != own_space:
            raise ValueError(
                f"Balancer state holds a bias added to the router's {saved_space} "
                f"(bias_update={saved.get('bias_update')!r}), this config adds it to {own_space}; "
                f"resume with BalanceConfig(bias_space={saved_space!r}) or start the bias afresh")
        self.num_steps = int(state["num_steps"])
        self._has_ema = bool(state["has_ema"])
        if self.config.adaptive_aux:  # otherwise the configured weight wins (a resumed run may change it)
            self._adaptive.coef = float(state["adaptive_coef"])

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Restore a state saved by ``state_dict``; refuses a state of another ``[L, E]``."""
        extra = state_dict.get("_extra_state")
        if extra is not None:
            self.set_extra_state(extra)  # shape check first, with a clear message
        # Window statistics are empty at a checkpoint, and states from another rule or an older version
        # lack the quantile/flip buffers: keep ours for what is missing, drop windows we do not keep.
        # The fold's estimator (CG iterate, direction, fit) restarts from zero where a state has none (saved with
        # fold_share=0); it is an estimate of the inputs' moments, not part of the routing. Likewise the quantile
        # step's shadow filters (older states; quantile_gain_LE was the retired adaptive step's).
        optional = {name for name, _ in _WINDOW_FIELDS + _FOLD_FIELDS} | {
            "quantile_hist_LEB", "quantile_range_L", "last_delta_sign_LE", "quantile_gain_LE", "quantile_shadow_GLE",
            "quantile_shadow_error_GL", "fold_v_LD", "fold_p_LD", "fold_a_LD", "fold_fit_L", "fold_mu_LD",
            "fold_started_L"}
        own = self.state_dict()
        state_dict = {k: v for k, v in state_dict.items() if k in own or k not in optional}
        state_dict.update({k: v for k, v in own.items() if k in optional and k not in state_dict})
        for name, buf in self.named_buffers():
            if name in state_dict and tuple(state_dict[name].shape) != tuple(buf.shape):
                raise ValueError(f"Balancer state {name!r} has shape {tuple(state_dict[name].shape)}, "
                                 f"expected {tuple(buf.shape)}")
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.aux_coef.fill_(self._adaptive.coef)
        for callback in self.step_callbacks:
            callback(self)
        return result

    def save(self, path: str | Path) -> Path:
        """Save the state (``torch.save`` of tensors and plain types only) to ``path``."""
        path = Path(path)
        torch.save(self.state_dict(), path)
        return path

    def load(self, path: str | Path) -> Balancer:
        """Load a state saved by :meth:`save`. Checkpoint folders are shared and downloaded, so
        nothing is unpickled: ``weights_only=True`` accepts tensors and plain types only."""
        self.load_state_dict(load_state_file(path, self.bias_LE.device))
        return self

    def extra_repr(self) -> str:
        c = self.config
        return (f"layers={self.num_layers}, experts={self.num_experts}, top_k={self.top_k}, "
                f"bias_update={c.bias_update!r}, aux_loss={c.aux_loss!r}, z_loss_coef={c.z_loss_coef}")


def _differ_count(idx_TK: torch.Tensor, other_TK: torch.Tensor, num_experts: int,
                  weight_T: torch.Tensor) -> torch.Tensor:
    """Weighted number of tokens whose set of chosen experts differs between two selections (fp64, 0-d)."""
    chosen_TE = torch.zeros(idx_TK.shape[0], num_experts, dtype=torch.int8, device=idx_TK.device)
    chosen_TE.scatter_(1, idx_TK.long(), 1)
    chosen_TE.scatter_add_(1, other_TK.long().to(idx_TK.device), torch.full_like(other_TK, 2, dtype=torch.int8,
                                                                                    device=idx_TK.device))
    # an expert in exactly one of the two selections has 1 or 2; in both, 3
    differ_T = ((chosen_TE == 1) | (chosen_TE == 2)).any(-1)
    return (differ_T.to(weight_T.dtype) * weight_T).sum().double()


def load_state_file(path: str | Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a saved balancer state without executing pickled code (tensors and plain types only)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises UnpicklingError for anything that is not plain data
        raise ValueError(f"moe_balance: {path} is not a plain balancer state (tensors and plain types); "
                         f"refusing to unpickle it: {error}") from error
