"""Two real processes (torchrun, gloo) equal one process on the concatenated data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moe_balance as mb
from moe_balance.testing import SkewedRouter

from .conftest import run_torchrun

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).parent / "workers" / "core_two_ranks.py"


def single_process_reference(rule):
    E, K, T = 8, 2, 512
    bal = mb.Balancer(num_layers=2, num_experts=E, top_k=K, aux_loss="global_batch", z_loss_coef=1e-3,
                      bias_update=rule)
    routers = [SkewedRouter(num_tokens=T, num_experts=E, top_k=K, seed=layer) for layer in range(2)]
    grads = []
    for _ in range(6):
        for layer, router in enumerate(routers):
            logits, idx = router.route(bal.bias_LE[layer])
            logits.requires_grad_(True)
            bal.observe(layer, logits, idx, selection_scores=torch.softmax(logits.detach(), -1))
            bal.loss().backward()
            grads.append(logits.grad)
        bal.step()
    return bal, grads


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """One torchrun for every scenario of this file (each rank writes <root>/<scenario>/rank<r>.pt)."""
    root = tmp_path_factory.mktemp("core_two_ranks")
    run_torchrun(SCRIPT, str(root), "sign", "quantile", "fold", nproc=2, timeout=300)
    return root


@pytest.mark.parametrize("rule", ["sign", "quantile"])
def test_two_ranks_equal_one_rank(rule, two_ranks):
    ranks = [torch.load(two_ranks / rule / f"rank{r}.pt", weights_only=False) for r in range(2)]
    ref, ref_grads = single_process_reference(rule)
    assert torch.equal(ranks[0]["bias"], ranks[1]["bias"])
    torch.testing.assert_close(ranks[0]["bias"], ref.bias_LE, rtol=0, atol=1e-7)
    assert ranks[0]["bias"].abs().max() > 0
    # one all-reduce per step for all layers together
    assert ranks[0]["calls"] == ranks[1]["calls"] == 6
    # DDP averages gradients over ranks: mean of the halves equals the full-batch gradient
    for g0, g1, g_ref in zip(ranks[0]["grads"], ranks[1]["grads"], ref_grads):
        torch.testing.assert_close(torch.cat([g0, g1]) / 2, g_ref, rtol=1e-4, atol=1e-8)
    assert ranks[0]["metrics"]["maxvio_global"] == pytest.approx(ref.metrics()["maxvio_global"])


def test_online_fold_on_two_ranks_equals_one_process(two_ranks, monkeypatch):
    """The fold's input sums ride the step's one all-reduce: both ranks edit their routers identically (bitwise),
    as one process does on the concatenated batches."""
    from moe_balance.testing import tiny_model

    from .workers.fold_two_ranks import calibration, fold_steps
    monkeypatch.setattr(mb.fold, "MIN_FIT", 0.05)  # random ids: fold at any fit, as the ranks did
    ranks = [torch.load(two_ranks / "fold" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    model = tiny_model("qwen3_moe", vocab_size=256, experts=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
    balancer = mb.patch(model, fold_share=0.5)
    fold_steps(model, balancer, calibration(6))
    assert ranks[0]["calls"] == ranks[1]["calls"] == 3  # one all-reduce per step
    changed = 0
    for name, weight in model.named_parameters():
        if name in before:
            assert torch.equal(ranks[0]["routers"][name], ranks[1]["routers"][name])
            changed += not torch.equal(weight.detach(), before[name])
            torch.testing.assert_close(ranks[0]["routers"][name], weight.detach(), rtol=0, atol=1e-5)
    assert changed >= 1  # layers whose inputs carry a constant fold (random-init embeddings may not, yet)
