"""Selection interception: a TorchFunctionMode active only during one router's forward.

It records the router's logits (the first E-wide ``linear`` output) and replaces the final
``topk(x, k=top_k)`` over E experts by ``idx = topk(x' + b).indices; values = x.gather(-1, idx)``
where ``x'`` is ``x`` or, with ``logit_space``, its logit-space reading (``log_softmax`` of the
softmax's input, the sigmoid's input): the bias changes which experts are chosen, never the values
the router goes on to use. With ``b = 0`` the same experts are chosen as by the original call (both
readings keep the order; gather returns the same values and routes the same gradient as topk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_TOPK = {torch.topk, torch.Tensor.topk}
_ARGMAX = {torch.argmax, torch.Tensor.argmax}
_LINEAR = {F.linear, torch._C._nn.linear}
_SIGMOID = {torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid}
_SOFTMAX = {torch.softmax, torch.Tensor.softmax, F.softmax}
_MASKED_FILL = {torch.masked_fill, torch.Tensor.masked_fill}


class SelectionInterceptor(TorchFunctionMode):
    """Bias the top-k selection over ``num_experts`` and record what the router computed."""

    def __init__(self, bias_E: torch.Tensor | None, num_experts: int, top_k: int,
                 zero_is_masked: bool = False, argmax: bool = False, clone_logits: bool = False,
                 logit_space: bool = False) -> None:
        super().__init__()
        self.logit_space = logit_space  # rank log-probabilities / logits instead of probabilities
        self.bias_E, self.num_experts, self.top_k = bias_E, num_experts, top_k
        self.zero_is_masked = zero_is_masked
        self.argmax = argmax  # DeepSpeed's top-1/top-2 gates choose by argmax
        self.clone_logits = clone_logits  # DeepSpeed's top-2 adds noise to its logits in place
        self.logits: torch.Tensor | None = None
        self.ranked: torch.Tensor | None = None  # what the first selection ranked, before our bias (bias space)
        self.first_probs: torch.Tensor | None = None  # the first selection's own input (DeepSpeed top-2)
        # softmax / sigmoid outputs of this forward -> how to read them in logit space (inputs kept alive
        # so ids are not reused while the mode is active)
        self._sources: dict[int, tuple[str, torch.Tensor, torch.Tensor | None, int]] = {}
        self.selections: list[torch.Tensor] = []
        self.linear_call: tuple | None = None  # (input, weight, bias) of the linear that gave the logits

    @property
    def intercepted(self) -> int:
        return len(self.selections)

    @property
    def indices(self) -> torch.Tensor | None:
        """``[T, K]`` experts chosen over all intercepted selections (top-2 by argmax: two)."""
        if not self.selections:
            return None
        return self.selections[0] if len(self.selections) == 1 else torch.cat(self.selections, -1)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _TOPK:
            return self._topk(func, args, kwargs)
        if self.argmax and func in _ARGMAX:
            return self._argmax(func, args, kwargs)
        out = func(*args, **kwargs)
        if func in _LINEAR and self.logits is None and isinstance(out, torch.Tensor) \
                and out.shape[-1] == self.num_experts:
            self.logits = out.clone() if self.clone_logits else out
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            self.linear_call = (args[0] if args else kwargs.get("input"), weight, bias)
        if self.logit_space and isinstance(out, torch.Tensor):
            self._track(func, args, kwargs, out)
        return out

    def _track(self, func, args, kwargs, out: torch.Tensor) -> None:
        """Remember score tensors whose logit-space reading is exact: a softmax (its log-softmax), a
        sigmoid (its input) and a masked_fill of a softmax (DeepSeek-V2's excluded groups: log 0 = -inf)."""
        src = args[0] if args else kwargs.get("input")
        if not isinstance(src, torch.Tensor):
            return
        if func in _SOFTMAX:
            dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
            self._sources[id(out)] = ("softmax", out, src, dim)
        elif func in _SIGMOID:
            self._sources[id(out)] = ("sigmoid", out, src, -1)
        elif func in _MASKED_FILL and self._sources.get(id(src), ("",))[0] == "softmax":
            self._sources[id(out)] = ("masked_softmax", out, None, -1)

    def _space(self, x: torch.Tensor) -> torch.Tensor:
        """What the bias is added to, fp32 and detached: ``x`` itself, or (``logit_space``) its exact
        logit-space reading when ``x`` came from a softmax or sigmoid in this forward.

        Probabilities of a collapsed softmax router are ~0 for most experts: their order, and so every
        token's second choice, is then decided by the bias alone and whole clusters of tokens move at
        once. Log-probabilities (logits, for sigmoid scores) keep the router's own order and spacing.
        The order is unchanged (both maps are monotone), so with a zero bias the selection is too.
        """
        kind, _, src, dim = self._sources.get(id(x), (None, None, None, -1))  # before detach: a new object
        if kind == "softmax":
            return torch.log_softmax(src.detach().float(), dim=dim)
        if kind == "sigmoid":
            return src.detach().float()
        if kind == "masked_softmax":
            return x.detach().float().log()
        return x.detach().float()

    def _topk(self, func, args, kwargs):
        x = args[0] if args else kwargs["input"]
        k = args[1] if len(args) > 1 else kwargs.get("k")
        dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
        if k != self.top_k or x.shape[-1] != self.num_experts or dim not in (-1, x.dim() - 1):
            return func(*args, **kwargs)  # e.g. a group top-k: not the expert selection
        rest = dict(kwargs)
        rest.pop("input", None), rest.pop("k", None), rest.pop("dim", None)
        for name, value in zip(("largest", "sorted"), args[3:]):
            rest[name] = value
        indices = torch.topk(self._biased(x), k, dim=-1, **rest).indices
        values = x.gather(-1, indices)
        self.selections.append(indices)
        return torch.return_types.topk((values, indices))

    def _argmax(self, func, args, kwargs):
        x = args[0] if args else kwargs["input"]
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if dim is None or x.dim() != 2 or x.shape[-1] != self.num_experts or dim not in (-1, 1):
            return func(*args, **kwargs)
        if self.selections and self.ranked is not None:
            # top-2's second pick ranks the (noised) logits with the first pick masked. Rank them as the
            # first pick's probabilities instead: softmax over the rest times (1 - p_first) is p_j again
            # (without noise), so both picks are argtop_2(p + b) and one bias means the same in both.
            # In logit space the same holds for log-probabilities: log_softmax(rest) + log(1 - p_first).
            p_first_T1 = self.first_probs.float().gather(-1, self.selections[0])
            if self.logit_space:
                scores = torch.log_softmax(x.detach().float(), dim=-1) + torch.log1p(-p_first_T1)
            else:
                scores = torch.softmax(x.detach().float(), dim=-1) * (1.0 - p_first_T1)
            choice = torch.where(torch.isneginf(x), torch.full_like(scores, float("-inf")), self._add_bias(scores))
        else:
            choice = self._biased(x)
        indices = torch.argmax(choice, dim=-1, keepdim=bool(kwargs.get("keepdim", False)))
        self.selections.append(indices.reshape(-1, 1))
        return indices

    def _masked(self, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Group-limited routers zero the scores of excluded groups: no bias may buy those back."""
        if not self.zero_is_masked:
            return scores
        return torch.where(x.detach() == 0, torch.full_like(scores, float("-inf")), scores)

    def _biased(self, x: torch.Tensor) -> torch.Tensor:
        """What the selection ranks: ``x`` read in the bias space, plus ``b``, in fp32 (no grad). The first
        selection's unbiased reading is kept in ``ranked`` (the quantile prices read it).

        fp32 because a bf16 router would round a small bias away (0.002 next to scores near 0.5).
        """
        scores = self._masked(x, self._space(x))
        if self.ranked is None:
            self.first_probs, self.ranked = x.detach(), scores
        return x.detach() if self.bias_E is None else self._add_bias(scores)

    def _add_bias(self, scores: torch.Tensor) -> torch.Tensor:
        if self.bias_E is None:
            return scores
        return scores.float() + self.bias_E.to(scores.device, torch.float32)
