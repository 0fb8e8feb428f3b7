"""Where the quantile rule's end-of-run imbalance comes from: the price's sampling noise or the router's drift.

    python benchmarks/price_noise.py --seeds 4                                # quick shape, 1k tokens per step
    python benchmarks/price_noise.py --batch 64 --steps 75 --pool 4           # 4k tokens per step, same tokens seen
    python benchmarks/price_noise.py --method quantile_full                   # the price set every step

After a quick-shape run (the quality benchmark's model, data and collapsed start), with the final router and
nothing learning, held-out MaxVio under:

* ``trained``: the bias the run ended with (as the run left it);
* ``pool``: the exact price of the next 16 training batches (the price floor);
* ``one batch``: the exact price of each of those batches alone (the best a price set from one step can do).

``one batch - pool`` is what one step's sampling noise costs; ``trained - one batch`` is what the router's
drift since the last price costs (plus the lag of a filtered price). Also the variance of the one-batch
prices across batches (``noise_var_measured``) and the mean square of the trained bias minus the pool's price.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/price_noise.py` from anywhere

import moe_balance as mb  # noqa: E402
from benchmarks.quality import METHODS, build, exact_price, sampling_floor  # noqa: E402
from moe_balance.testing import batches, evaluate_heldout, stdlib_corpus  # noqa: E402


def study(seed: int, args, train, val, sample) -> dict:
    model = build(seed, args.hidden, None, sample)
    balancer = mb.patch(model, mb.BalanceConfig(**METHODS[args.method][0]), attach_loss=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    stream = batches(train, args.batch, args.seq, seed=seed)
    curve = []
    for _ in range(args.steps):
        ids = next(stream)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        balancer.step()
        curve.append(balancer.metrics()["maxvio_global"])
    for p in model.parameters():
        p.requires_grad_(False)
    trained = balancer.bias_LE.clone()
    share = balancer.metrics().get("bias_step_share", 1.0)
    val_loss, held = evaluate_heldout(model, balancer, val, args.eval_batches, seed=1234)
    out = {"trained": held["maxvio_global"], "train_last10": statistics.mean(curve[-10:]),
           "share": share, "val_loss": val_loss, "first_below_1": next(
               (i for i in range(len(curve)) if statistics.mean(curve[max(0, i - 9):i + 1]) < 1.0), -1)}
    pool = [next(stream) for _ in range(args.pool)]
    pool_bias = exact_price(model, balancer, pool, iters=20)
    out["pool"] = evaluate_heldout(model, balancer, val, args.eval_batches, seed=1234)[1]["maxvio_global"]
    singles, biases = [], []
    for ids in pool[:args.singles]:
        balancer.bias_LE.copy_(trained)
        bias = exact_price(model, balancer, [ids], iters=20)
        biases.append(bias - bias.mean(-1, keepdim=True))
        singles.append(evaluate_heldout(model, balancer, val, args.eval_batches, seed=1234)[1]["maxvio_global"])
    out["one_batch"] = statistics.mean(singles)
    stack = torch.stack(biases)
    out["noise_var_measured"] = float(stack.var(0).mean())
    centred = pool_bias - pool_bias.mean(-1, keepdim=True)
    out["trained_vs_pool_ms"] = float((trained.double() - trained.double().mean(-1, keepdim=True) - centred)
                                      .pow(2).mean())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="quantile", choices=[m for m in METHODS if m.startswith("quantile")])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pool", type=int, default=16)
    p.add_argument("--singles", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    train, _ = stdlib_corpus(max_bytes=8_000_000)
    val, _ = stdlib_corpus(split="val")
    sample = next(batches(train, 8, 64, seed=9))
    print(f"tokens/step {args.batch * args.seq}, steps {args.steps}; window sampling floor "
          f"{sampling_floor(args.batch * args.seq):.3f}", flush=True)
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        r = study(seed, args, train, val, sample)
        rows.append(r)
        print(f"seed {seed}: " + "  ".join(f"{k} {v:.4g}" for k, v in r.items()), flush=True)
    tag = f"{args.method}_{args.batch * args.seq}"
    summary = {k: (statistics.mean(r[k] for r in rows), statistics.pstdev(r[k] for r in rows)) for k in rows[0]}
    lines = [f"price noise, {args.method}, {args.batch * args.seq} tokens/step x {args.steps} steps, seeds "
             f"{args.first_seed}-{args.first_seed + args.seeds - 1}, pool {args.pool} batches; mean ± std", "",
             "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {m:.4g} ± {sd:.2g} |" for k, (m, sd) in summary.items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"price_noise_{tag}.md").write_text("\n".join(lines) + "\n")
    (out / f"price_noise_{tag}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
