"""Balance quality of every method on one byte-level LM task, same seed and token budget for all.

    python benchmarks/quality.py --quick            # ~10 min on 2 CPU cores
    python benchmarks/quality.py                    # the full run (see README for its wall time)
    python benchmarks/quality.py --quick --steps 20 --seeds 1 --methods none,sign   # smoke

Data: the Python standard library's own .py sources (no test/, no site-packages), sorted and
hashed; every 10th file is held out. Model: a transformers Qwen3-MoE built from a config
(4 layers, 16 experts, top-2). Each method trains from the same seed on the same batches; the
table reports held-out loss (and bits per byte), MaxVio over the whole held-out set ("global")
and per held-out batch ("batch"), dead experts, the share of assignments over capacity at
capacity factors 1.0 and 1.25, and the median step time. Results: Markdown + CSV + a MaxVio plot
in --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import moe_balance as mb
from moe_balance.testing import batches, evaluate_heldout, stdlib_corpus, tiny_model

# name -> (BalanceConfig fields, transformers' own router_aux_loss_coef or None)
METHODS: dict[str, tuple[dict, float | None]] = {
    "none": ({"bias_update": "none"}, None),
    "hf_aux_1e-2": ({"bias_update": "none"}, 1e-2),
    "switch_1e-3": ({"bias_update": "none", "aux_loss": "switch", "aux_loss_coef": 1e-3}, None),
    "switch_1e-2": ({"bias_update": "none", "aux_loss": "switch", "aux_loss_coef": 1e-2}, None),
    "switch_1e-2+z": ({"bias_update": "none", "aux_loss": "switch", "aux_loss_coef": 1e-2, "z_loss_coef": 1e-3}, None),
    "global_batch_1e-2": ({"bias_update": "none", "aux_loss": "global_batch", "aux_loss_coef": 1e-2}, None),
    "adaptive_switch": ({"bias_update": "none", "aux_loss": "switch", "aux_loss_coef": 1e-2, "adaptive_aux": True,
                         "adaptive_target_maxvio": 0.1, "adaptive_max_coef": 1e-1}, None),
    "sign_1e-3": ({"bias_update": "sign", "bias_update_rate": 1e-3}, None),
    "sign_1e-3+z": ({"bias_update": "sign", "bias_update_rate": 1e-3, "z_loss_coef": 1e-3}, None),
    "normalized_1e-3": ({"bias_update": "normalized", "bias_update_rate": 1e-3}, None),
    "sign+seq_1e-4": ({"bias_update": "sign", "bias_update_rate": 1e-3, "aux_loss": "seq", "aux_loss_coef": 1e-4},
                      None),
}


def build(seed: int, hidden: int, hf_coef: float | None):
    extra = {"output_router_logits": hf_coef is not None, "router_aux_loss_coef": hf_coef or 0.0}
    return tiny_model("qwen3_moe", seed=seed, experts=16, top_k=2, vocab_size=256, hidden_size=hidden,
                      intermediate_size=2 * hidden, moe_intermediate_size=hidden, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, **extra)


def evaluate(model, balancer, val, n_batches: int) -> dict[str, float]:
    loss, m = evaluate_heldout(model, balancer, val, n_batches, seed=1234)
    return {"val_loss": loss, "bpb": loss / math.log(2), "maxvio_global": m["maxvio_global"],
            "maxvio_batch": m["maxvio_batch"], "dead_experts": m["dead_experts"], "dropped@1.0": m["dropped@1"],
            "dropped@1.25": m["dropped@1.25"]}


def run_one(name: str, seed: int, args, train, val) -> dict:
    fields, hf_coef = METHODS[name]
    model = build(seed, args.hidden, hf_coef)
    balancer = mb.patch(model, mb.BalanceConfig(**fields), attach_loss=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    stream = batches(train, args.batch, args.seq, seed=seed)
    times, curve = [], []
    for step in range(args.steps):
        ids = next(stream)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss  # includes transformers' aux when hf_coef is set
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        balancer.step()
        times.append(time.perf_counter() - start)
        curve.append((step, balancer.metrics()["maxvio_global"]))
    row = {"method": name, "seed": seed, **evaluate(model, balancer, val, args.eval_batches),
           "step_ms": 1e3 * statistics.median(times)}
    return {"row": row, "curve": curve}


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        summary = {"method": name, "seeds": len(mine)}
        for key in ("val_loss", "bpb", "maxvio_global", "maxvio_batch", "dead_experts", "dropped@1.0",
                    "dropped@1.25", "step_ms"):
            values = [r[key] for r in mine]
            summary[key] = statistics.mean(values)
            summary[key + "_spread"] = (max(values) - min(values)) / 2
        out.append(summary)
    return out


def markdown(summary: list[dict], header: str) -> str:
    cols = [("val loss", "val_loss", 3), ("bits/byte", "bpb", 3), ("MaxVio global", "maxvio_global", 2),
            ("MaxVio batch", "maxvio_batch", 2), ("dead", "dead_experts", 1), ("drop@1.0", "dropped@1.0", 3),
            ("drop@1.25", "dropped@1.25", 3), ("step ms", "step_ms", 0)]
    lines = [header, "", "| method | " + " | ".join(c[0] for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for s in summary:
        cells = [f"{s[k]:.{d}f} ± {s[k + '_spread']:.{d}f}" for _, k, d in cols]
        lines.append(f"| {s['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="hidden 64, 300 steps, 2 seeds")
    p.add_argument("--steps", type=int)
    p.add_argument("--seeds", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    args.steps = args.steps or (300 if args.quick else 1500)
    args.seeds = args.seeds or (2 if args.quick else 3)
    args.hidden = args.hidden or (64 if args.quick else 128)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train, digest = stdlib_corpus(max_bytes=8_000_000)
    val, _ = stdlib_corpus(split="val")
    print(f"corpus: stdlib .py sources, file-list hash {digest}; {train.numel():,} train / {val.numel():,} "
          f"held-out bytes; {args.steps} steps x {args.batch}x{args.seq} bytes, seeds {args.seeds}, "
          f"hidden {args.hidden}", flush=True)
    wall = time.time()
    rows, curves = [], {}
    for seed in range(args.seeds):
        for name in methods:
            result = run_one(name, seed, args, train, val)
            rows.append(result["row"])
            curves.setdefault(name, result["curve"])
            r = result["row"]
            print(f"  seed {seed} {name:<18} val {r['val_loss']:.3f}  MaxVio {r['maxvio_global']:.3f}  "
                  f"dead {r['dead_experts']:.0f}  {r['step_ms']:.0f} ms/step", flush=True)
    summary = summarize(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "quick" if args.quick else "full"
    header = (f"Quality ({tag}): Qwen3-MoE 4 layers, hidden {args.hidden}, 16 experts top-2; {args.steps} steps of "
              f"{args.batch}x{args.seq} stdlib bytes; held-out {args.eval_batches}x16x128 bytes; mean ± half-range "
              f"over {args.seeds} seeds; corpus hash {digest}; wall {time.time() - wall:.0f} s")
    table = markdown(summary, header)
    (out / f"quality_{tag}.md").write_text(table)
    with (out / f"quality_{tag}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / f"quality_{tag}_curves.json").write_text(json.dumps(curves))
    try:
        from moe_balance.plot import plot_maxvio
        plot_maxvio({n: ([s for s, _ in c], [v for _, v in c]) for n, c in curves.items()},
                    out / f"quality_{tag}_maxvio.png", smooth=max(1, args.steps // 20),
                    title=f"training-window MaxVio (seed 0, moving average of {max(1, args.steps // 20)} steps)")
    except ImportError:
        pass
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
