"""Online fold: the router weights carry the bias's routing at every step, so what ships is what trained.

Stock transformers, vLLM and SGLang read only a checkpoint's weights. A selection bias kept beside them
is lost when a generic router (no bias buffer of its own) is served. After every step the fold moves a
share of the bias the routers apply into their weights and takes it off the bias; the controller keeps
pricing from the current scores, so it corrects whatever the fold did not reproduce exactly.

A bias ``b`` in logit space is a constant per expert. A router ``logits = W x`` carries it where the
router has a linear bias (exact), otherwise through the direction ``a`` with ``a . x_t ~ 1`` for the
router inputs ``x_t``: ``W += b a^T`` shifts token t's logits by ``b (a . x_t)``. The least-squares
direction is ``v = S^-1 mu`` (``mu``, ``S``: first and second moments of the inputs), rescaled here to
``a = v / (mu . v)`` so the mean shift over the inputs is exactly ``b`` (minimum variance among the unbiased
ones). ``S`` is ``d x d`` per layer, too big to keep or all-reduce at real widths (94 layers of 4096: 6.3 GB),
so ``v`` is estimated online by conjugate gradients, one iteration per step, matrix-free: the forwards add
``sum x``, ``sum x (x . v)``, ``sum x (x . p)`` and ``sum |x|^2`` of the real tokens into the step window
(``3 d + 2`` numbers per layer riding the step's one all-reduce); the step then knows ``S v`` and ``S p``
exactly for that step's tokens and takes an exact line search along ``p``. State: ``v`` and ``p``,
``2 L d`` numbers. All ranks hold the same reduced sums, so they compute the same delta and the router
weights stay bitwise equal (each engine's copy is edited where it lives: see :mod:`.weights`).
"""

from __future__ import annotations

import torch

RIDGE = 1e-3
"""Ridge on ``S``, relative to its mean eigenvalue ``tr(S)/d``: keeps the iteration stable in directions the
inputs barely span (measured: 1e-4..1e-2 give the same served balance on the quality benchmark)."""
MIN_FIT = 0.05
"""No first fold while ``mu . v`` (the share of a constant the inputs explain, ``R^2``) is below this: the
first step only sets the search direction. A fold moves token t's logits by ``b (a . x_t)``, whose spread
around ``b`` is ``sqrt(1/R^2 - 1)`` of it; 0.9 here measured better on both benchmarks (a collapsed router's
first tenth 1.05x instead of 1.15x the bias-only MaxVio, the fine-tune's train-like ship 1.08x instead of
1.20x, 4 seeds each) but failed the LlamaFactory run of a skewed random-init model, whose fit stays low for
tens of steps: the bias piled up and one large fold then raised its training-window MaxVio. Left at 0.05."""
FIT_FLOOR = 0.05
"""The direction's normalisation ``a = v / (mu . v)`` is taken no lower than this: inputs that carry almost no
constant would blow ``a`` up (the first step only sets the search direction). Once a layer has folded, it
folds at every step whose fit is above this: the one-step estimate of the fit wanders around 0.9 on some
models (the README demo's), and stopping then would leave a bias beside the weights at those steps."""


def fold_ready(fit_L: torch.Tensor, started_L: torch.Tensor) -> torch.Tensor:
    """Per layer, whether the fold moves the bias this step: the fit reached :data:`MIN_FIT`, or the layer has
    folded before and its fit is above :data:`FIT_FLOOR`."""
    return (fit_L >= MIN_FIT) | (started_L & (fit_L >= FIT_FLOOR))


def input_statistics(x_TD: torch.Tensor, weight_T: torch.Tensor, v_D: torch.Tensor, p_D: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One router call's contribution: ``[3, D]`` rows ``sum w x``, ``sum w x (x.v)``, ``sum w x (x.p)`` and
    ``[2]`` ``sum w``, ``sum w |x|^2`` (fp32 math, fp64 out). ``weight_T`` is 1 for real tokens, 0 for padding
    and non-finite rows. Two small matmuls; no host sync."""
    x_TD = x_TD.float()
    x_TD = torch.where(weight_T[:, None] > 0, x_TD, torch.zeros_like(x_TD))  # a NaN row must not leak in
    w_T = weight_T.float()
    proj_T2 = x_TD @ torch.stack([v_D, p_D], -1).to(x_TD.device, torch.float32)
    rows_3T = torch.stack([w_T, w_T * proj_T2[:, 0], w_T * proj_T2[:, 1]])
    sums_3D = (rows_3T @ x_TD).double()
    scalars_2 = torch.stack([w_T.sum(), (w_T * x_TD.pow(2).sum(-1)).sum()]).double()
    return sums_3D, scalars_2


@torch.no_grad()
def cg_step(v_LD: torch.Tensor, p_LD: torch.Tensor, sums_L3D: torch.Tensor, scalars_L2: torch.Tensor,
            ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """One conjugate-gradient iteration per layer on ``(S + lam I) v = mu`` from one step's reduced sums.

    Updates ``v_LD`` and ``p_LD`` in place (layers without tokens are left alone) and returns the fold
    direction ``a_LD = v / (mu . v)`` and the fit ``R^2 = mu . v`` per layer (0 where there is no fit yet).
    """
    n_L1 = scalars_L2[:, :1]
    active_L1 = n_L1 > 0
    n_L1 = n_L1.clamp_min(1.0)
    mu_LD, Sv_LD, Sp_LD = (sums_L3D[:, i] / n_L1 for i in range(3))
    lam_L1 = ridge * scalars_L2[:, 1:2] / n_L1 / v_LD.shape[-1]
    v, p = v_LD.double(), p_LD.double()
    r_LD = mu_LD - Sv_LD - lam_L1 * v  # residual at v for this step's tokens
    q_LD = Sp_LD + lam_L1 * p  # (S + lam) p
    pq_L1 = (p * q_LD).sum(-1, keepdim=True)
    has_dir = pq_L1 > 0
    alpha_L1 = torch.where(has_dir, (r_LD * p).sum(-1, keepdim=True) / pq_L1.clamp_min(1e-300), 0.0)
    v_new = v + alpha_L1 * p
    r_new = r_LD - alpha_L1 * q_LD
    beta_L1 = torch.where(has_dir, (r_new * q_LD).sum(-1, keepdim=True) / pq_L1.clamp_min(1e-300), 0.0)
    p_new = r_new - beta_L1 * p
    # The moments move between steps: restart as steepest descent when p_new is no descent direction.
    p_new = torch.where((p_new * r_new).sum(-1, keepdim=True) > 0, p_new, r_new)
    v_LD.copy_(torch.where(active_L1, v_new, v).to(v_LD.dtype))
    p_LD.copy_(torch.where(active_L1, p_new, p).to(p_LD.dtype))
    fit_L = (mu_LD * v_LD.double()).sum(-1)
    fit_L = torch.where(active_L1[:, 0], fit_L, torch.zeros_like(fit_L))
    a_LD = v_LD.double() / fit_L[:, None].clamp_min(FIT_FLOOR)
    return a_LD, fit_L


__all__ = ["input_statistics", "cg_step", "fold_ready", "RIDGE", "MIN_FIT", "FIT_FLOOR"]
