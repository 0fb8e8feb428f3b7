"""moe-balance in a minute: a skewed tiny MoE learns Python source bytes while the bias rebalances it.

    python examples/quickstart.py            # about a minute on 2 CPU cores
    python examples/quickstart.py --steps 100 --out runs/quick

A tiny Mixtral (4 layers, 16 experts, top-2) is built from a config and its routers are skewed
towards a few experts, the way a collapsed router looks. It then trains on the standard
library's own ``.py`` files (byte-level, no downloads) with the default rule, Quantile Balancing
(``--rule sign --rate 1e-3`` for the Loss-Free paper's sign rule). Live line:
LM loss and MaxVio of the current step; at the end a before/after table on held-out files (also as the
saved model routes in stock transformers), the saved model (``OUT/model``), a layer x expert heatmap
(``OUT/heatmap.png``) and the run plot (``OUT/balance.png``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import moe_balance as mb
from moe_balance.stats_log import StatsWriter
from moe_balance.testing import batches, evaluate_heldout, skew_routers, stdlib_corpus, tiny_model


def evaluate(model, balancer, val):
    """Held-out LM loss and balance, without touching the bias."""
    loss, m = evaluate_heldout(model, balancer, val, n_batches=8)
    return {"val loss": loss, "MaxVio": m["maxvio_global"], "dead experts": m["dead_experts"],
            "CV": m["cv"], "dropped @cf1": m["dropped@1"]}, balancer.load_matrix().tolist()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--rule", default="quantile", help="bias_update: quantile (default, no rate), sign, ...")
    parser.add_argument("--rate", type=float, default=1e-3, help="bias update rate u of the rate rules (sign, ...)")
    parser.add_argument("--out", default="runs/quickstart")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train, digest = stdlib_corpus(max_bytes=4_000_000)
    val, _ = stdlib_corpus(max_bytes=400_000, split="val")
    print(f"corpus: {train.numel():,} train / {val.numel():,} held-out bytes of stdlib sources (list hash {digest})")
    model = tiny_model("mixtral", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       experts=16, top_k=2)
    skew_routers(model, next(batches(train, 8, 64, seed=9)), strength=3.0)
    balancer = mb.patch(model, mb.BalanceConfig(bias_update=args.rule, bias_update_rate=args.rate), attach_loss=True)
    # The default rule folds its bias into the router weights after every step (BalanceConfig.fold_share): the
    # weights carry the routing throughout, so the model saved at any step routes in stock transformers / vLLM
    # as it did here.
    before, loads_before = evaluate(model, balancer, val)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stats = StatsWriter(out / "moe_balance_stats.jsonl")
    stats.path.unlink(missing_ok=True)
    print(f"bias rule: {args.rule}" + (f" (rate {args.rate:g})" if args.rule != "quantile" else " (no rate)"))
    stream, start = batches(train, 16, 64), time.time()
    for step in range(1, args.steps + 1):
        ids = next(stream)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        balancer.step()
        metrics = balancer.metrics()
        if step % 10 == 0 or step == args.steps:
            stats.write(step, metrics, balancer)
        done = step / args.steps
        bar = "#" * int(30 * done) + "." * (30 - int(30 * done))
        print(f"\r[{bar}] step {step}/{args.steps}  loss {loss.item():.3f}  MaxVio {metrics['maxvio_global']:.2f}  "
              f"differs stock {metrics['routing_differ']:.3f}  {time.time() - start:.0f}s", end="", flush=True)
    print()

    after, loads_after = evaluate(model, balancer, val)  # as trained: the weights plus what the bias still holds
    mb.export.ship(model, None)  # folds that remainder into the router weights along the online direction
    with mb.export.as_stock(balancer):  # what stock transformers does with the saved weights
        stock, _ = evaluate(model, balancer, val)
    print(f"\n{'held-out (8x16x128 bytes)':<26}{'before':>10}{'trained':>10}{'saved, stock':>14}")
    for key in before:
        print(f"{key:<26}{before[key]:>10.3f}{after[key]:>10.3f}{stock[key]:>14.3f}")
    mb.export.save_pretrained(model, out / "model")
    print(f"\nsaved: {out / 'model'} (check it: python -m moe_balance check-export {out / 'model'})")
    try:
        from moe_balance.plot import plot_load_heatmap, plot_run
        heatmap = plot_load_heatmap(loads_before, loads_after, out / "heatmap.png",
                                    titles=(f"before (MaxVio {before['MaxVio']:.2f})",
                                            f"after {args.steps} steps (MaxVio {after['MaxVio']:.2f})"))
        print(f"\nheatmap: {heatmap}\nrun plot: {plot_run(out, out / 'balance.png')}")
    except ImportError as exc:
        print(f"\n(no plots: {exc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
