"""Hand-computed values, minima and maxima of every balance loss."""

from __future__ import annotations

import math

import pytest
import torch

import moe_balance as mb
from moe_balance.losses import RoutingBatch, scores_to_probs, segments_from_seq_len


def batch_from_probs(probs, chosen, weight=None, seq_len=None, global_f=None, top_k=None):
    probs_TE = torch.tensor(probs, dtype=torch.float32)
    idx_TK = torch.tensor(chosen, dtype=torch.long).reshape(len(probs), -1)
    weight_T = torch.ones(len(probs)) if weight is None else torch.tensor(weight, dtype=torch.float32)
    counts_E = torch.zeros(probs_TE.shape[1]).index_add_(
        0, idx_TK.reshape(-1), weight_T[:, None].expand_as(idx_TK).reshape(-1))
    gf = None if global_f is None else torch.tensor(global_f)
    segment_T, num_segments = segments_from_seq_len(len(probs), seq_len) if seq_len else (None, None)
    return RoutingBatch(probs_TE.log(), probs_TE, weight_T, counts_E, idx_TK,
                        top_k or idx_TK.shape[1], segment_T, num_segments, gf)


# Two tokens, two experts, both choose expert 0:
#   probs [[.75, .25], [.5, .5]] -> P = [.625, .375], counts [2, 0], f = N*count/(K*T) = [2, 0]
SKEWED = dict(probs=[[0.75, 0.25], [0.5, 0.5]], chosen=[[0], [0]])


@pytest.mark.parametrize("name, expected", [
    ("switch", 2 * 0.625),                              # f.P = 2*.625 + 0*.375
    ("importance_cv", 0.0625),                          # I = [1.25, .75]: var .0625 / mean^2 1
    ("load_cv", 1.0),                                   # soft load [1.25, 0]: var .390625 / .390625
    ("kl_uniform", 0.625 * math.log(1.25) + 0.375 * math.log(0.75)),
    ("entropy", 1.0),                                   # all soft load on one expert: H = 0
    ("seq", 2 * 0.625),                                 # one sequence of 2 = switch
])
def test_hand_computed_values(name, expected):
    got = mb.aux_loss(name, batch_from_probs(**SKEWED, seq_len=2))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_global_batch_uses_the_given_load_fractions():
    # f from the global window [0.5, 1.5]: loss = .5*.625 + 1.5*.375
    got = mb.aux_loss("global_batch", batch_from_probs(**SKEWED, global_f=[0.5, 1.5]))
    assert got.item() == pytest.approx(0.5 * 0.625 + 1.5 * 0.375)


def test_sequence_loss_averages_per_sequence_products():
    # seq A: tokens choose 0,1 with probs [.9,.1],[.2,.8] -> f=[1,1], P=[.55,.45] -> 1.0
    # seq B: tokens choose 0,0 with probs [.6,.4],[.7,.3] -> f=[2,0], P=[.65,.35] -> 1.3
    b = batch_from_probs([[.9, .1], [.2, .8], [.6, .4], [.7, .3]], [[0], [1], [0], [0]], seq_len=2)
    assert mb.aux_loss("seq", b).item() == pytest.approx((1.0 + 1.3) / 2)
    # the whole-batch switch loss mixes the two: counts [3,1] -> f=[1.5,.5], P=[.6,.4]
    assert mb.aux_loss("switch", b).item() == pytest.approx(1.5 * 0.6 + 0.5 * 0.4)


def test_z_loss_matches_formula():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    expected = (math.log(math.e + math.e ** 2 + math.e ** 3) ** 2 + math.log(3) ** 2) / 2
    assert mb.z_loss(logits, torch.ones(2)).item() == pytest.approx(expected, rel=1e-6)
    # a masked token does not count
    assert mb.z_loss(logits, torch.tensor([1.0, 0.0])).item() == pytest.approx(
        math.log(math.e + math.e ** 2 + math.e ** 3) ** 2, rel=1e-6)


def routing(E, K, balanced):
    """T = E tokens, each sure of one expert (balanced) or all sure of expert 0..K-1 (collapsed)."""
    T = E * 4
    probs = torch.full((T, E), 1e-9)
    if balanced:
        chosen = torch.stack([(torch.arange(T) + j) % E for j in range(K)], 1)
    else:
        chosen = torch.arange(K).expand(T, K)
    probs.scatter_(1, chosen, 1.0 / K)
    probs = probs / probs.sum(1, keepdim=True)
    return batch_from_probs(probs.tolist(), chosen.tolist(), seq_len=len(probs))


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("name, best, worst", [
    ("switch", 1.0, "N/K"), ("seq", 1.0, "N/K"), ("importance_cv", 0.0, None),
    ("load_cv", 0.0, None), ("kl_uniform", 0.0, "log(N/K)"), ("entropy", 0.0, "1-log(K)/log(N)"),
])
def test_balanced_is_minimum_and_collapsed_is_maximum(name, best, worst, K):
    E = 8
    balanced = mb.aux_loss(name, routing(E, K, True)).item()
    collapsed = mb.aux_loss(name, routing(E, K, False)).item()
    assert balanced == pytest.approx(best, abs=1e-5)
    assert collapsed > balanced + 0.5
    expected_worst = {"N/K": E / K, "log(N/K)": math.log(E / K), "1-log(K)/log(N)": 1 - math.log(K) / math.log(E),
                      None: None}[worst]
    if expected_worst is not None:
        assert collapsed == pytest.approx(expected_worst, rel=1e-4)


def test_sigmoid_scores_are_normalised_over_experts():
    logits = torch.tensor([[0.0, 1.0, -1.0]])
    s = torch.sigmoid(logits)
    assert torch.allclose(scores_to_probs(logits, "sigmoid"), s / s.sum())
    # the router's own scores take precedence over recomputing them from the logits
    own = torch.tensor([[0.2, 0.2, 0.6]])
    assert torch.allclose(scores_to_probs(logits, "sigmoid", own), own)


@pytest.mark.parametrize("name", sorted(mb.AUX_LOSS_FNS))
def test_losses_have_gradients_to_the_logits(name):
    logits = torch.randn(32, 8, requires_grad=True)
    probs = torch.softmax(logits, -1)
    idx = probs.topk(2).indices
    counts = torch.zeros(8).index_add_(0, idx.reshape(-1), torch.ones(64))
    b = RoutingBatch(logits, probs, torch.ones(32), counts, idx, 2, *segments_from_seq_len(32, 8),
                     torch.linspace(0.5, 1.5, 8))
    mb.aux_loss(name, b).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_seq_loss_refuses_to_guess_sequence_boundaries():
    # Without boundaries it used to become the Switch loss silently (one "sequence" = the batch).
    b = batch_from_probs(**SKEWED)
    with pytest.raises(ValueError, match="sequence boundaries"):
        mb.aux_loss("seq", b)
    bal = mb.Balancer(mb.BalanceConfig(aux_loss="seq"), num_layers=1, num_experts=2, top_k=1)
    logits = torch.randn(4, 2, requires_grad=True)
    with pytest.raises(ValueError, match="sequence boundaries"):
        bal.observe(0, logits, logits.topk(1).indices)


def test_packed_segments_equal_the_same_sequences_in_rows():
    # Two sequences of 3 and 5 tokens packed in one row == the same two sequences padded to rows of 5.
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(8, 4, generator=g), -1)
    idx = probs.topk(2).indices
    packed = RoutingBatch(probs.log(), probs, torch.ones(8), torch.zeros(4), idx, 2,
                          torch.tensor([0, 0, 0, 1, 1, 1, 1, 1]), 8)
    rows_probs = torch.cat([probs[:3], torch.full((2, 4), 0.25), probs[3:]])
    rows_idx = torch.cat([idx[:3], torch.zeros(2, 2, dtype=torch.long), idx[3:]])
    weight = torch.tensor([1, 1, 1, 0, 0, 1, 1, 1, 1, 1.0])
    rows = RoutingBatch(rows_probs.log(), rows_probs, weight, torch.zeros(4), rows_idx, 2,
                        *segments_from_seq_len(10, 5))
    assert torch.allclose(mb.aux_loss("seq", packed), mb.aux_loss("seq", rows))
    switch = RoutingBatch(probs.log(), probs, torch.ones(8),
                          torch.zeros(4).index_add_(0, idx.reshape(-1), torch.ones(16)), idx, 2)
    assert not torch.allclose(mb.aux_loss("seq", packed), mb.aux_loss("switch", switch))
