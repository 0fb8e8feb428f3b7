"""What the online fold costs at real widths: added state, added all-reduce bytes and ``Balancer.step()`` time.

    python benchmarks/fold_scale.py                 # Qwen3-235B-A22B and gpt-oss-120b router shapes, 3 seeds
    python benchmarks/fold_scale.py --repeats 2 --shapes gpt-oss-120b     # smoke

For each shape the balancer is built as patching builds it (``router_dim`` = hidden) with the fold on and off;
the routers are plain ``[E, D]`` tensors edited as the fold edits them (no model is built). A window of random
router inputs is observed, then ``step()`` (bias update, CG iteration, fold into every router) is timed. The
end-of-training fold this replaces kept fp64 ``d x d`` moments per layer (printed for comparison).
Ratios are against the same balancer with ``fold_share=0`` in the same run; mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import moe_balance as mb
from moe_balance.patching.folding import FoldIntoRouters

SHAPES = {  # layers, hidden, experts, top_k
    "Qwen3-235B-A22B": (94, 4096, 128, 8),
    "gpt-oss-120b": (36, 2880, 128, 4),
    "toy": (4, 64, 16, 2),  # the smoke test's
}


class _Site:  # what FoldIntoRouters reads of a patched router
    def __init__(self, layer: int, weight: torch.nn.Parameter) -> None:
        self.layer, self.num_experts = layer, weight.shape[0]
        self.module = torch.nn.Module()
        self.module.weight = weight


def window_bytes(balancer: mb.Balancer) -> int:
    return sum(getattr(balancer, name).numel() * 8 for name, _ in balancer._window_fields)


def state_bytes(balancer: mb.Balancer) -> int:
    window = {name for name, _ in balancer._window_fields}
    return sum(b.numel() * b.element_size() for n, b in balancer.named_buffers() if n not in window)


def one(shape: tuple[int, int, int, int], fold: bool, seed: int, tokens: int, repeats: int) -> dict[str, float]:
    L, D, E, K = shape
    torch.manual_seed(seed)
    bal = mb.Balancer(num_layers=L, num_experts=E, top_k=K, router_dim=D if fold else None,
                      fold_share=1.0 if fold else 0.0)
    routers = [torch.nn.Parameter(torch.randn(E, D) * 0.02) for _ in range(L)]
    if fold:
        bal.post_step_hooks.append(FoldIntoRouters([_Site(layer, w) for layer, w in enumerate(routers)]))
    x_TD = torch.randn(tokens, D) + 0.5  # router inputs with a mean
    times = []
    for _ in range(repeats):
        for layer in range(L):
            logits = x_TD @ routers[layer].detach().T
            scores = logits.log_softmax(-1)
            idx = (scores + bal.bias_LE[layer]).topk(K).indices
            bal.observe(layer, logits, idx, selection_scores=scores, router_input=x_TD)
        start = time.perf_counter()
        bal.step()
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times[1:] or times), "window_bytes": window_bytes(bal),
            "state_bytes": state_bytes(bal)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="Qwen3-235B-A22B,gpt-oss-120b", help=f"comma-separated, of {list(SHAPES)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=4, help="steps timed per seed (the first is warm-up)")
    p.add_argument("--tokens", type=int, default=256, help="router inputs observed per layer and step")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.seeds} seeds, "
          f"{args.tokens} tokens/layer\n")
    print("| shape (L, d, E, k) | added state | added all-reduce per step | all-reduce total | step() fold on / off "
          "| d x d fp64 moments (replaced) |")
    print("|---|---|---|---|---|---|")
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        L, D = shape[:2]
        on = [one(shape, True, s, args.tokens, args.repeats) for s in range(args.seeds)]
        off = [one(shape, False, s, args.tokens, args.repeats) for s in range(args.seeds)]
        ratios = [a["step_s"] / b["step_s"] for a, b in zip(on, off)]
        added_state = on[0]["state_bytes"] - off[0]["state_bytes"]
        added_window = on[0]["window_bytes"] - off[0]["window_bytes"]
        ms_on = statistics.mean(r["step_s"] for r in on) * 1e3
        ms_off = statistics.mean(r["step_s"] for r in off) * 1e3
        ratio = f"x{statistics.mean(ratios):.2f} ± {statistics.pstdev(ratios):.2f}"
        print(f"| {name} ({', '.join(map(str, shape))}) | {added_state / 2**20:.1f} MiB "
              f"| {added_window / 2**20:.1f} MiB "
              f"| {on[0]['window_bytes'] / 2**20:.1f} MiB | {ms_on:.0f} / {ms_off:.0f} ms ({ratio}) "
              f"| {L * D * D * 8 / 2**30:.1f} GiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
