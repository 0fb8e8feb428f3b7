"""Step-time and memory overhead of patching, against the unpatched model, in one run.

    python benchmarks/overhead.py                  # Mixtral and Qwen3-MoE, 4 layers, 8 experts, top-2, seq 512
    python benchmarks/overhead.py --toy            # tiny sizes (smoke test)

Variants, timed interleaved (one step of each in turn) after warm-up, median of --steps:
  unpatched            the stock model
  bias                 patched, loss-free bias only (sign rule)
  quantile             patched, Quantile Balancing (the default: margin histograms in observe)
  bias+aux+z           patched, bias + global-batch aux loss + z-loss (attached to the router outputs)
  hf_aux               stock model with transformers' own output_router_logits=True aux loss
A step is forward + backward + AdamW step (+ Balancer.step where patched). Memory is what autograd
saves for backward in one forward (unique storages; deterministic, unlike RSS), measured in a
separate process for each variant. Last, Balancer.step() for 60 layers x
256 experts, and the all-reduce calls per step counted in a real 2-process gloo group.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import moe_balance as mb
from moe_balance.testing import tiny_model

VARIANTS = {
    "unpatched": None,
    "bias": {"bias_update": "sign"},
    "quantile": {"bias_update": "quantile"},
    "bias+aux+z": {"bias_update": "sign", "aux_loss": "global_batch", "aux_loss_coef": 1e-3, "z_loss_coef": 1e-3},
    "hf_aux": None,
}


def build(arch: str, variant: str, sizes: dict):
    model = tiny_model(arch, seed=0, vocab_size=256, output_router_logits=(variant == "hf_aux"),
                       router_aux_loss_coef=1e-3, **sizes)
    balancer = mb.patch(model, VARIANTS[variant], attach_loss=True) if VARIANTS[variant] else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, balancer, optimizer


def one_step(model, balancer, optimizer, ids) -> float:
    start = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if balancer is not None:
        balancer.step()
    return time.perf_counter() - start


def sizes_for(toy: bool) -> tuple[dict, int, int]:
    if toy:
        return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, experts=8, top_k=2), 2, 64
    return dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, experts=8, top_k=2), 4, 512


def time_arch(arch: str, toy: bool, steps: int, warmup: int) -> dict[str, float]:
    sizes, batch, seq = sizes_for(toy)
    built = {v: build(arch, v, sizes) for v in VARIANTS}
    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(warmup + steps):
        for v, (model, balancer, optimizer) in built.items():
            elapsed = one_step(model, balancer, optimizer, ids)
            if i >= warmup:
                samples[v].append(elapsed)
    return {v: 1e3 * statistics.median(s) for v, s in samples.items()}


def saved_for_backward_mb(arch: str, variant: str, toy: bool, steps: int) -> float:
    """Bytes autograd saves for backward in one forward (unique storages), in MB: the activation
    memory a variant adds. Deterministic, unlike RSS, which the allocator's caching blurs."""
    sizes, batch, seq = sizes_for(toy)
    model, balancer, optimizer = build(arch, variant, sizes)
    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(seen.values()) / 2**20


def saved_memory_mb(arch: str, variant: str, toy: bool, steps: int) -> float:
    """Saved-activation memory (see :func:`saved_for_backward_mb`) measured in a fresh process."""
    code = (f"import benchmarks.overhead as o; print(o.saved_for_backward_mb({arch!r}, {variant!r}, {toy}, {steps}))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": root}, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _count_allreduce(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    L, E, K, T = 60, 256, 8, 512
    bal = mb.Balancer(num_layers=L, num_experts=E, top_k=K)  # the default: quantile, histograms all-reduced too
    logits = torch.randn(T, E)
    probs = torch.softmax(logits, -1)
    idx = probs.topk(K).indices
    times = []
    for _ in range(5):
        for layer in range(L):
            bal.observe(layer, logits, idx, selection_scores=probs)
        start = time.perf_counter()
        bal.step()
        times.append(time.perf_counter() - start)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"calls": bal.reducer.calls, "steps": bal.num_steps,
                       "step_ms": 1e3 * statistics.median(times)}, f)
    dist.destroy_process_group()


def allreduce_per_step() -> dict:
    import socket

    import torch.multiprocessing as tmp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    tmp.spawn(_count_allreduce, args=(2, port, path), nprocs=2, join=True)
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--archs", default="mixtral,qwen3_moe")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--memory-variants", default=",".join(VARIANTS),
                   help="variants whose saved-for-backward memory is measured (one fresh process each)")
    args = p.parse_args(argv)
    measured = [v for v in args.memory_variants.split(",") if v]
    unknown = [v for v in measured if v not in VARIANTS]
    if unknown:
        p.error(f"--memory-variants: unknown {unknown}; choose from {list(VARIANTS)}")
    results: dict = {}
    for arch in args.archs.split(","):
        ms = time_arch(arch, args.toy, args.steps, args.warmup)
        mem = {v: saved_memory_mb(arch, v, args.toy, 3) if v in measured else math.nan for v in VARIANTS}
        results[arch] = {"step_ms": ms, "saved_memory_mb": mem}
        print(f"{arch}: median of {args.steps} interleaved steps (fwd+bwd+AdamW)")
        for v in VARIANTS:
            print(f"  {v:<12} {ms[v]:8.1f} ms  x{ms[v] / ms['unpatched']:.3f}   saved for backward {mem[v]:7.1f} MB "
                  f"(x{mem[v] / max(mem['unpatched'], 1e-9):.3f})")
    results["step_60x256"] = allreduce_per_step()
    r = results["step_60x256"]
    print(f"Balancer.step() 60 layers x 256 experts, 2 gloo ranks: {r['step_ms']:.2f} ms, "
          f"all-reduce calls per step: {r['calls'] / r['steps']:.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
