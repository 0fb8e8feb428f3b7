"""Cost of the core per layer against a router's own work, and of one step() for 60 x 256.

    python benchmarks/core_overhead.py [--tokens 8192] [--experts 256] [--top-k 8] [--layers 60]

Prints medians of interleaved repeats and their ratios (one run, same process, same tensors):
* ``topk``: a bare ``torch.topk`` of the logits (the floor of any router);
* ``router``: softmax + topk + renormalise (what a Mixtral-style router does after its matmul);
* ``observe``: counting only (bias rule); ``observe+loss``: with the global-batch aux loss and z-loss,
  forward and backward of the loss;
* ``step``: one ``Balancer.step()`` for all layers (bias update, metrics window), and the number of
  all-reduce calls per step when a process group is up (here: none, so the count is printed from the
  reducer's counter in tests/test_distributed_core.py instead).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import moe_balance as mb


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--layers", type=int, default=60)
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args()
    T, E, K, L = a.tokens, a.experts, a.top_k, a.layers
    torch.manual_seed(0)
    logits = torch.randn(T, E, requires_grad=True)
    idx = logits.detach().topk(K).indices
    mask = torch.ones(T, dtype=torch.bool)
    probs = torch.softmax(logits.detach(), -1)
    counting = mb.Balancer(num_layers=L, num_experts=E, top_k=K, bias_update="sign")
    quantile = mb.Balancer(num_layers=L, num_experts=E, top_k=K, bias_update="quantile")
    lossy = mb.Balancer(num_layers=L, num_experts=E, top_k=K, aux_loss="global_batch", z_loss_coef=1e-3,
                        bias_update="sign")

    def topk():
        torch.topk(logits.detach(), K, dim=-1)

    def router():
        with torch.no_grad():
            probs = torch.softmax(logits, -1)
            v, _ = torch.topk(probs, K, dim=-1)
            v / v.sum(-1, keepdim=True)

    def observe():
        counting.observe(0, logits.detach(), idx, mask)

    def observe_quantile():
        quantile.observe(0, logits.detach(), idx, mask, selection_scores=probs)

    def observe_loss():
        lossy.observe(0, logits, idx, mask)
        lossy.loss().backward()

    names = {"topk": topk, "router": router, "observe": observe, "observe quantile": observe_quantile,
             "observe+loss": observe_loss}
    for fn in names.values():  # warm-up
        fn()
    samples = {n: [] for n in names}
    for _ in range(a.repeats):  # interleaved
        for n, fn in names.items():
            samples[n] += timed(fn, 1)
    med = {n: statistics.median(v) * 1e3 for n, v in samples.items()}
    for _ in range(L - 1):
        counting.observe(0, logits.detach(), idx, mask)
    step_ms = statistics.median(timed(counting.step, 5)) * 1e3
    for layer in range(L):
        quantile.observe(layer, logits.detach(), idx, mask, selection_scores=probs)
    quantile_step_ms = statistics.median(timed(quantile.step, 5)) * 1e3
    print(f"T={T} E={E} K={K} L={L}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for n, v in med.items():
        print(f"  {n:<17} {v:8.2f} ms/layer   x{v / med['topk']:.2f} of topk   "
              f"x{v / med['router']:.2f} of router")
    print(f"  overhead observe      = {100 * med['observe'] / med['router']:.0f}% of a router forward (no matmul)")
    quantile_share = 100 * med["observe quantile"] / med["router"]
    print(f"  overhead observe quantile = {quantile_share:.0f}% (counts + margin histogram)")
    share = 100 * med["observe+loss"] / med["router"]
    print(f"  overhead observe+loss = {share:.0f}% (forward + backward of the loss)")
    print(f"  step() for {L} layers: {step_ms:.2f} ms (sign), {quantile_step_ms:.2f} ms (quantile); "
          "all-reduce calls per step: 1 when distributed (0 here)")


if __name__ == "__main__":
    main()
