"""Which router tensors take the online fold, and the step hook that moves the bias into them."""

from __future__ import annotations

import torch

from .. import fold as fold_math
from ..weights import add_to_param
from .registry import router_owner
from .strategies import RouterSite, full_shape


def fold_targets(site: RouterSite) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The router's ``[E, D]`` linear weight and its ``[E]`` linear bias (or None), found among its parameters
    (ZeRO-3 partitioned ones by their full shape); None when it has no such weight."""
    E = site.num_experts
    owner = router_owner(site.module, E)  # a block patched for its router: the router's weights
    params = list(owner.parameters())
    weights = [p for p in params if len(full_shape(p)) == 2 and full_shape(p)[0] == E]
    if len(weights) != 1:
        return None
    biases = [p for p in params if full_shape(p) == (E,)]
    return weights[0], (biases[0] if len(biases) == 1 else None)


class FoldIntoRouters:
    """After each step (``Balancer.post_step_hooks``): move ``fold_share`` of each generic router's bias into
    its weights, exactly into its linear bias where it has one, else along the balancer's online direction
    ``a`` (:mod:`moe_balance.fold`), and take off the bias what the weights took. Layers whose inputs do not
    explain a constant well enough yet (:func:`moe_balance.fold.fold_ready`: the first steps, or inputs without
    a constant) keep their bias this step. Weights kept in bf16/fp16 with no master copy round a small edit
    away; there the logit shift the edit really made (its mean over the last step's inputs) comes off the bias
    and the rest stays, applied by the patch, until it is large enough to land: nothing of the price is lost."""

    def __init__(self, sites: list[RouterSite]) -> None:
        self.sites = sites

    @torch.no_grad()
    def __call__(self, balancer) -> None:
        moved = self.fold(balancer, balancer.config.fold_share_resolved)
        # the logit shift the weights took this step (the bias a rule without the fold would show); no host sync
        balancer.fold_moved_abs_max = torch.stack([m.abs().max() for m in moved.values()]).max() if moved else None

    @torch.no_grad()
    def fold(self, balancer, share: float) -> dict[int, torch.Tensor]:
        """Fold ``share`` of every generic router's bias now; returns what each layer took (``[E]``, fp32)."""
        if balancer.router_dim is None or share == 0:
            return {}
        ready_L = fold_math.fold_ready(balancer.fold_fit_L, balancer.fold_started_L)
        fits = ready_L.tolist()  # one host sync per step, outside the forward
        moved = {}
        for site in self.sites:
            # looked up at every step: fully_shard (patched before it) and engines swap the Parameter objects
            weight, lin_bias = fold_targets(site)
            exact = lin_bias is not None
            if not (exact or fits[site.layer]):
                continue
            delta_E = share * balancer.bias_LE[site.layer].float()  # fp32: an [E, D] edit per router per step
            if exact:  # gpt-oss: the router's own constant
                taken = add_to_param(lin_bias, delta_E)
                shift_E = delta_E if taken is None else taken
            else:
                a_D = balancer.fold_a_LD[site.layer].to(delta_E.device)
                taken = add_to_param(weight, delta_E[:, None] * a_D[None, :])
                # what the rounded edit shifts the logits by, on average over the inputs a was fitted to
                shift_E = delta_E if taken is None else (
                    taken.double() @ balancer.fold_mu_LD[site.layer].to(taken.device)).float()
            balancer.bias_LE[site.layer] -= shift_E.to(balancer.bias_LE.device, balancer.bias_LE.dtype)
            balancer.fold_started_L[site.layer] = True
            moved[site.layer] = shift_E.float()
        return moved


__all__ = ["fold_targets", "FoldIntoRouters"]
