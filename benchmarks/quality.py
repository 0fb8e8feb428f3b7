"""Balance quality of every method on one byte-level LM task, same seed and token budget for all.

    python benchmarks/quality.py --quick            # 4 seeds, 300 steps, hidden 64 (see README for the wall time)
    python benchmarks/quality.py                    # the full shape: 1500 steps, hidden 128, 2 seeds, fewer rows
    python benchmarks/quality.py --quick --steps 20 --seeds 1 --methods none,sign_1e-3   # smoke

Data: the Python standard library's own .py sources (no test/, no site-packages), sorted and
hashed; every 10th file is held out. Model: a transformers Qwen3-MoE built from a config
(4 layers, 16 experts, top-2) whose routers are skewed at the start (a collapsed router: the
methods must rebalance it). Each method trains from the same seed on the same batches.

Two phases:
* learning router: the table reports held-out loss (and bits per byte), MaxVio over the whole
  held-out set ("global") and per held-out batch, dead experts, "steps to balance" (the first step
  from which the training-window MaxVio stays below twice its sampling floor, printed beside it)
  and the median step time;
* frozen router (``--frozen-steps``; as under LoRA, where the bias is the only balancing force):
  steps to balance only.
Mean ± std [min-max] over seeds. Tiny-model trajectories vary by machine and by seed: compare rows
of one run, not numbers across machines. Results: Markdown + CSV + a MaxVio plot in --out.
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
from moe_balance import export, stats
from moe_balance.testing import batches, evaluate_heldout, skew_routers, stdlib_corpus, tiny_model

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
    "sign_1e-2": ({"bias_update": "sign", "bias_update_rate": 1e-2}, None),
    "quantile": ({"bias_update": "quantile"}, None),
    "quantile+seq_1e-4": ({"bias_update": "quantile", "aux_loss": "seq", "aux_loss_coef": 1e-4}, None),
    "quantile_in_scores": ({"bias_update": "quantile", "bias_space": "scores"}, None),  # bias on probabilities
    "quantile_full": ({"bias_update": "quantile", "quantile_step": "full"}, None),  # the price set every step
    # the bias kept beside the weights (no fold): the "bias-only" reference; served, it is dropped
    "quantile_no_fold": ({"bias_update": "quantile", "fold_share": 0.0}, None),
    "quantile_fold_0.1": ({"bias_update": "quantile", "fold_share": 0.1}, None),
    "quantile_fold_0.3": ({"bias_update": "quantile", "fold_share": 0.3}, None),
    "quantile_fold_0.03": ({"bias_update": "quantile", "fold_share": 0.03}, None),
}
QUICK_METHODS = ["none", "hf_aux_1e-2", "switch_1e-2", "global_batch_1e-2", "sign_1e-3", "sign+seq_1e-4",
                 "quantile", "quantile_full", "quantile+seq_1e-4", "quantile_in_scores"]
FULL_METHODS = ["none", "hf_aux_1e-2", "sign_1e-3", "sign+seq_1e-4", "quantile", "quantile_full"]
FROZEN_METHODS = ["none", "sign_1e-3", "sign_1e-2", "quantile", "quantile_full"]
EXPERTS, TOP_K = 16, 2


def build(seed: int, hidden: int, hf_coef: float | None, sample: torch.Tensor):
    extra = {"output_router_logits": hf_coef is not None, "router_aux_loss_coef": hf_coef or 0.0}
    model = tiny_model("qwen3_moe", seed=seed, experts=EXPERTS, top_k=TOP_K, vocab_size=256, hidden_size=hidden,
                       intermediate_size=2 * hidden, moe_intermediate_size=hidden, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, **extra)
    skew_routers(model, sample, strength=3.0)  # a collapsed start
    return model


def sampling_floor(tokens: int, repeats: int = 200) -> float:
    """Mean MaxVio of perfectly balanced routing (k distinct experts uniformly at random per token)
    measured on ``tokens`` tokens: what a window of that size shows even when nothing is wrong."""
    gen = torch.Generator().manual_seed(0)
    values = []
    for _ in range(repeats):
        idx = torch.rand(tokens, EXPERTS, generator=gen).topk(TOP_K).indices
        counts = torch.zeros(EXPERTS, dtype=torch.float64).index_add_(0, idx.reshape(-1),
                                                                      torch.ones(idx.numel(), dtype=torch.float64))
        values.append(float(stats.maxvio(counts[None])[0]))
    return statistics.mean(values)


def exact_price(model, balancer, pool: list[torch.Tensor], iters: int) -> torch.Tensor:
    """The bias that balances ``pool`` as a whole for the router as it stands: the quantile price set in full
    (whatever ``quantile_step`` the run used) ``iters`` times on the pool, with the fold's hooks off (the price
    alone: no weight moves). Returns that bias (fp64)."""
    hooks, balancer.post_step_hooks = balancer.post_step_hooks, []
    controller_config, balancer._bias.cfg = balancer._bias.cfg, balancer.config.replace(quantile_step="full")
    try:
        with torch.enable_grad():  # recorded as training windows; nothing needs grad, no backward
            for _ in range(iters):
                for ids in pool:
                    model(input_ids=ids)
                balancer.step()
    finally:
        balancer.post_step_hooks = hooks
        balancer._bias.cfg = controller_config
    return balancer.bias_LE.double().clone()


def price_floor(model, balancer, pool: list[torch.Tensor], val, eval_batches: int, iters: int = 30,
                train: torch.Tensor | None = None) -> dict:
    """What a bias can reach for this router as it stands: the quantile rule iterated ``iters`` times on a
    fixed pool of training batches (nothing learns; the bias that balances the pool as a whole), then
    MaxVio per training batch of that pool and over the held-out set under that bias.

    * ``floor_batch``: a deterministic router balanced exactly over the pool still varies from batch to
      batch with what the batch holds (16 windows of contiguous bytes); the independent-token sampling
      floor ignores that, so it is a lower bound no router reaches.
    * ``floor_heldout``: held-out files differ from the training files; no bias estimated on training data
      does better on them than the pool's exact price.
    * ``floor_like`` (with ``train``): the same on unseen batches drawn like the training ones.
    """
    if not balancer.config.uses_quantile:
        raise ValueError("price_floor needs a quantile balancer")
    frozen = [p for p in model.parameters() if p.requires_grad]
    for param in frozen:
        param.requires_grad_(False)
    try:
        exact_price(model, balancer, pool, iters)
        pooled = balancer.metrics()["maxvio_global"]
        per_batch = []
        for ids in pool:
            with balancer.measuring():
                model(input_ids=ids)
            per_batch.append(balancer.metrics()["maxvio_global"])
        _, held = evaluate_heldout(model, balancer, val, eval_batches, seed=1234)
        like = (evaluate_heldout(model, balancer, train, eval_batches, seed=LIKE_SEED)[1]["maxvio_global"]
                if train is not None else math.nan)
    finally:
        for param in frozen:
            param.requires_grad_(True)
    return {"floor_pool": pooled, "floor_batch": statistics.mean(per_batch), "floor_heldout": held["maxvio_global"],
            "floor_like": like}


def steps_to_balance(curve: list[float], bound: float) -> int | None:
    """First step from which the training-window MaxVio stays below ``bound`` (None: never)."""
    for step in range(len(curve)):
        if all(v < bound for v in curve[step:]):
            return step + 1
    return None


LIKE_SEED = 4321  # unseen batches drawn like the training ones: random windows of the training files


def evaluate(model, balancer, val, train, n_batches: int) -> dict[str, float]:
    loss, m = evaluate_heldout(model, balancer, val, n_batches, seed=1234)
    like = evaluate_heldout(model, balancer, train, n_batches, seed=LIKE_SEED)[1]["maxvio_global"]
    with export.as_stock(balancer):  # what stock transformers will do with the saved weights
        stock_loss, stock = evaluate_heldout(model, balancer, val, n_batches, seed=1234)
        like_stock = evaluate_heldout(model, balancer, train, n_batches, seed=LIKE_SEED)[1]["maxvio_global"]
    return {"val_loss": loss, "bpb": loss / math.log(2), "maxvio_global": m["maxvio_global"],
            "maxvio_batch": m["maxvio_batch"], "dead_experts": m["dead_experts"], "dropped@1.0": m["dropped@1"],
            "dropped@1.25": m["dropped@1.25"], "val_loss_stock": stock_loss, "maxvio_stock": stock["maxvio_global"],
            "maxvio_like": like, "maxvio_like_stock": like_stock}


def run_one(name: str, seed: int, args, train, val, sample, steps: int, frozen: bool) -> dict:
    fields, hf_coef = METHODS[name]
    model = build(seed, args.hidden, hf_coef, sample)
    balancer = mb.patch(model, mb.BalanceConfig(**fields), attach_loss=True)
    if frozen:  # LoRA-like: the routers do not learn, the bias is the only balancing force
        for site in mb.patching.patch_state_of(model).sites:
            site.module.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    stream = batches(train, args.batch, args.seq, seed=seed)
    times, curve, differ = [], [], []
    for _ in range(steps):
        ids = next(stream)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss  # includes transformers' aux when hf_coef is set
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        balancer.step()
        times.append(time.perf_counter() - start)
        metrics = balancer.metrics()
        curve.append(metrics["maxvio_global"])
        differ.append(metrics["routing_differ"])
    reached = steps_to_balance(curve, 2 * args.floor)
    row = {"method": name, "seed": seed, "frozen": frozen, "steps_to_balance": reached if reached else math.nan,
           "step_ms": 1e3 * statistics.median(times), "routing_differ_mean": statistics.mean(differ),
           "routing_differ_last10": statistics.mean(differ[-10:])}
    if not frozen:
        row.update(evaluate(model, balancer, val, train, args.eval_batches))
        shipped = balancer.router_dim is not None
    trained_bias = balancer.bias_LE.clone()
    if balancer.config.uses_quantile and args.floor_batches:
        pool = [next(stream) for _ in range(args.floor_batches)]  # batches the run would have trained on next
        row.update(price_floor(model, balancer, pool, val, args.eval_batches, train=train))
        floor = row["floor_batch"]
        balanced = steps_to_balance(curve, 2 * floor)
        row["steps_to_2x_floor_batch"] = balanced if balanced else math.nan
    if not frozen and shipped:  # what the integrations ship: the remainder folded along the online direction
        balancer.bias_LE.copy_(trained_bias)  # the price floor moved only the bias (its fold hook was off)
        export.fold_bias(model)
        loss, m = evaluate_heldout(model, balancer, val, args.eval_batches, seed=1234)
        row.update({"val_loss_shipped": loss, "maxvio_shipped": m["maxvio_global"]})
    return {"row": row, "curve": curve}


def _stat(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "missing": len(values)}
    return {"mean": statistics.mean(finite), "std": statistics.pstdev(finite) if len(finite) > 1 else 0.0,
            "min": min(finite), "max": max(finite), "missing": len(values) - len(finite)}


def summarize(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        out.append({"method": name, "seeds": len(mine), **{k: _stat([r.get(k, math.nan) for r in mine]) for k in keys}})
    return out


def _cell(stat: dict[str, float], digits: int) -> str:
    if math.isnan(stat["mean"]):
        return "never"
    text = f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f} [{stat['min']:.{digits}f}-{stat['max']:.{digits}f}]"
    return text + (f" ({stat['missing']} never)" if stat["missing"] else "")


def markdown(summary: list[dict], cols: list[tuple[str, str, int]], header: str) -> str:
    lines = [header, "", "| method | " + " | ".join(c[0] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for s in summary:
        lines.append(f"| {s['method']} | " + " | ".join(_cell(s[k], d) for _, k, d in cols) + " |")
    return "\n".join(lines) + "\n"


LEARNING_COLS = [("val loss", "val_loss", 3), ("MaxVio global (held-out)", "maxvio_global", 2),
                 ("val loss stock", "val_loss_stock", 3), ("MaxVio stock", "maxvio_stock", 2),
                 ("MaxVio train-like", "maxvio_like", 2), ("MaxVio train-like stock", "maxvio_like_stock", 2),
                 ("val loss, remainder folded", "val_loss_shipped", 3),
                 ("MaxVio, remainder folded", "maxvio_shipped", 2),
                 ("MaxVio batch", "maxvio_batch", 2), ("dead", "dead_experts", 1),
                 ("steps to balance", "steps_to_balance", 0), ("step ms", "step_ms", 0),
                 ("routing differs from stock (run mean)", "routing_differ_mean", 3),
                 ("routing differs (last 10 steps)", "routing_differ_last10", 3)]
FROZEN_COLS = [("steps to balance (frozen router)", "steps_to_balance", 0), ("step ms", "step_ms", 0)]
FLOOR_COLS = [("pool (exact price)", "floor_pool", 2), ("per training batch", "floor_batch", 2),
              ("held-out", "floor_heldout", 2), ("train-like", "floor_like", 2),
              ("steps until < 2x per-batch floor", "steps_to_2x_floor_batch", 0)]
FLOOR_HEADER = ("Price floors (quantile rows; the run's final router, nothing learning, the bias iterated 30 times on "
                "{n} training batches; MaxVio)")


# The served model against the bias-only reference, paired by seed: which column of a benchmark's rows holds
# the served (stock-loaded) and the patched MaxVio on the held-out files and on train-like batches, and the losses.
SERVED_KEYS_QUALITY = {"served": ("maxvio_stock", "maxvio_like_stock"), "patched": ("maxvio_global", "maxvio_like"),
                       "loss_served": "val_loss_stock", "loss_patched": "val_loss"}
SERVED_KEYS_FINETUNE = {"served": ("maxvio_stock", "maxvio_like_stock"),
                        "patched": ("maxvio_patched", "maxvio_like_patched"),
                        "loss_served": "val_stock", "loss_patched": "val_patched"}


def _mean_sd(values: list[float], digits: int) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "-"
    return f"{statistics.mean(finite):.{digits}f} ± {statistics.pstdev(finite):.{digits}f}"


def paired_table(rows: list[dict], keys: dict, reference: str = "quantile_no_fold", baseline: str = "none") -> str:
    """Per method, paired by seed: served MaxVio over the bias-only run's patched MaxVio (held-out files and
    train-like batches), served loss minus that run's patched loss and minus the unbalanced run's."""
    by = {(r["method"], int(float(r["seed"]))): r for r in rows}
    names = list(dict.fromkeys(r["method"] for r in rows))
    (served, served_like), (patched, patched_like) = keys["served"], keys["patched"]
    lines = [f"| method | served / {reference} patched MaxVio, held-out | same, train-like batches | "
             f"served loss - {reference} patched | served loss - {baseline} |", "|---|---|---|---|---|"]
    for name in names:
        seeds = [s for (m, s) in by if m == name and (reference, s) in by and (baseline, s) in by]
        if not seeds:
            continue
        pick = [(by[(name, s)], by[(reference, s)], by[(baseline, s)]) for s in seeds]

        def get(row: dict, key: str) -> float:  # older CSVs lack the train-like columns
            return float(row.get(key, math.nan))
        ratio = [get(m, served) / get(ref, patched) for m, ref, _ in pick]
        ratio_like = [get(m, served_like) / get(ref, patched_like) for m, ref, _ in pick]
        d_ref = [get(m, keys["loss_served"]) - get(ref, keys["loss_patched"]) for m, ref, _ in pick]
        d_base = [get(m, keys["loss_served"]) - get(base, keys["loss_served"]) for m, _, base in pick]
        lines.append(f"| {name} | {_mean_sd(ratio, 3)} | {_mean_sd(ratio_like, 3)} | {_mean_sd(d_ref, 4)} | "
                     f"{_mean_sd(d_base, 4)} |")
    return "\n".join(lines) + "\n"


def stretch_table(curves: dict[str, list[list[float]]], reference: str = "quantile_no_fold") -> str:
    """Training-window MaxVio per tenth of the run (mean over seeds), and the worst tenth's ratio to the
    bias-only run's (``reference``): does a method give the balance up anywhere in the run?"""
    if reference not in curves:
        return ""

    def tenths(runs: list[list[float]]) -> list[float]:
        n = len(runs[0])
        bounds = [(i * n // 10, max((i + 1) * n // 10, i * n // 10 + 1)) for i in range(10)]  # >= 1 step each
        return [statistics.mean(statistics.mean(r[a:b]) for r in runs) for a, b in bounds]

    ref = tenths(curves[reference])
    header = " | ".join(f"{10 * i}-{10 * (i + 1)}%" for i in range(10))
    lines = [f"| method | {header} | worst ratio to bias-only |",
             "|---" * 12 + "|"]
    for name, runs in curves.items():
        mine = tenths(runs)
        worst = max(m / r for m, r in zip(mine, ref))
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in mine) + f" | {worst:.2f} |")
    return "\n".join(lines) + "\n"


def write_tables(out: Path, tag: str, learning: list[dict], frozen: list[dict], header: str, frozen_header: str,
                 floor_batches: int, curves: dict[str, list[list[float]]] | None = None) -> str:
    """Write ``quality_<tag>.md`` (learning, frozen-router and price-floor tables) and ``quality_<tag>.csv``
    (every row) under ``out``; return the Markdown."""
    table = ""
    if learning:
        table += markdown(summarize(learning, tuple(k for _, k, _ in LEARNING_COLS)), LEARNING_COLS, header)
    if frozen:
        table += "\n" + markdown(summarize(frozen, ("steps_to_balance", "step_ms")), FROZEN_COLS, frozen_header)
    table += floor_table(learning + frozen, floor_batches)
    if any(r["method"] == "quantile_no_fold" for r in learning) and any(r["method"] == "none" for r in learning):
        table += "\nPaired by seed (served = stock view)\n\n" + paired_table(learning, SERVED_KEYS_QUALITY)
    if curves and "quantile_no_fold" in curves:
        seeds = len(curves["quantile_no_fold"])
        table += (f"\nTraining-window MaxVio per tenth of the run (mean over {seeds} seeds)\n\n"
                  + stretch_table(curves))
    (out / f"quality_{tag}.md").write_text(table)
    rows = learning + frozen
    with (out / f"quality_{tag}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    return table


def floor_table(rows: list[dict], batches: int) -> str:
    with_floor = [r for r in rows if not math.isnan(r.get("floor_batch", math.nan))]
    if not with_floor:
        return ""
    keys = tuple(k for _, k, _ in FLOOR_COLS)
    frozen = [dict(r, method=f"{r['method']} (frozen router)") if r["frozen"] in (True, "True") else r
              for r in with_floor]
    return "\n" + markdown(summarize(frozen, keys), FLOOR_COLS, FLOOR_HEADER.format(n=batches))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="hidden 64, 300 steps, 4 seeds, more rows")
    p.add_argument("--steps", type=int)
    p.add_argument("--seeds", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--methods", help="learning-router rows (default: a set per mode)")
    p.add_argument("--frozen-methods", help="frozen-router rows ('' to skip)")
    p.add_argument("--frozen-steps", type=int, default=30)
    p.add_argument("--floor-batches", type=int, default=16,
                   help="quantile rows: pool size for the price floors after the run (0 = skip)")
    p.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed + seeds - 1")
    p.add_argument("--tag", help="output name (default quick/full); use one per process when splitting a run")
    p.add_argument("--merge", nargs="+", metavar="CSV",
                   help="only rebuild the tables from these CSVs (later files replace rows of the same method, "
                        "seed and phase) and write them under --out with --tag")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    if args.merge:
        return merge_tables(args)
    args.steps = args.steps or (300 if args.quick else 1500)
    args.seeds = args.seeds or (4 if args.quick else 2)
    args.hidden = args.hidden or (64 if args.quick else 128)
    methods = [m for m in (args.methods or ",".join(QUICK_METHODS if args.quick else FULL_METHODS)).split(",") if m]
    frozen = [m for m in (",".join(FROZEN_METHODS) if args.frozen_methods is None else args.frozen_methods
                          ).split(",") if m]
    unknown = [m for m in methods + frozen if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    train, digest = stdlib_corpus(max_bytes=8_000_000)
    val, _ = stdlib_corpus(split="val")
    sample = next(batches(train, 8, 64, seed=9))
    args.floor = sampling_floor(args.batch * args.seq)
    print(f"corpus: stdlib .py sources, file-list hash {digest}; {train.numel():,} train / {val.numel():,} "
          f"held-out bytes; {args.steps} steps x {args.batch}x{args.seq} bytes, seeds {args.seeds}, "
          f"hidden {args.hidden}; training-window sampling floor {args.floor:.3f} "
          f"(steps to balance: below {2 * args.floor:.3f})", flush=True)
    wall = time.time()
    rows, frozen_rows, curves = [], [], {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for name in methods:
            result = run_one(name, seed, args, train, val, sample, args.steps, frozen=False)
            rows.append(result["row"])
            curves.setdefault(name, []).append(result["curve"])
            r = result["row"]
            print(f"  seed {seed} {name:<18} val {r['val_loss']:.3f}  MaxVio {r['maxvio_global']:.3f}  "
                  f"dead {r['dead_experts']:.0f}  balanced at {r['steps_to_balance']}  {r['step_ms']:.0f} ms/step",
                  flush=True)
        for name in frozen:
            r = run_one(name, seed, args, train, val, sample, args.frozen_steps, frozen=True)["row"]
            frozen_rows.append(r)
            print(f"  seed {seed} frozen {name:<11} balanced at {r['steps_to_balance']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or ("quick" if args.quick else "full")
    header = (f"Quality ({tag}): Qwen3-MoE 4 layers, hidden {args.hidden}, {EXPERTS} experts top-{TOP_K}, routers "
              f"skewed at the start; {args.steps} steps of {args.batch}x{args.seq} stdlib bytes, AdamW {args.lr}; "
              f"held-out {args.eval_batches}x16x128 bytes; mean ± std [min-max] over {args.seeds} seeds; "
              f"training-window sampling floor {args.floor:.3f} (balanced = below {2 * args.floor:.3f} from then on); "
              f"corpus hash {digest}; wall {time.time() - wall:.0f} s")
    table = write_tables(out, tag, rows, frozen_rows, header,
                         f"Frozen router (as under LoRA): {args.frozen_steps} steps, same start and data",
                         args.floor_batches, curves)
    (out / f"quality_{tag}_curves.json").write_text(json.dumps(curves))
    try:
        from moe_balance.plot import plot_maxvio
        plot_maxvio({n: (list(range(len(runs[0]))), runs[0]) for n, runs in curves.items()},
                    out / f"quality_{tag}_maxvio.png", smooth=max(1, args.steps // 20),
                    title=f"training-window MaxVio (seed 0, moving average of {max(1, args.steps // 20)} steps)")
    except ImportError:
        pass
    print()
    print(table)
    return 0


def merge_runs(paths: list[str], keep: set[str] | None = None) -> tuple[list[dict], dict[str, list[list[float]]]]:
    """Rows and training-window curves of finished runs (a CSV each, its ``_curves.json`` beside it), e.g. one
    process per pair of seeds. A later file replaces the rows and curves of the same method and seed (and
    phase), so a re-run of one method merges over an earlier full run. ``keep``: only these methods."""
    rows: dict[tuple, dict] = {}
    by_seed: dict[tuple, list[float]] = {}  # (method, seed) -> curve
    for path in paths:
        learned_seeds: dict[str, list[float]] = {}
        for raw in csv.DictReader(open(path, newline="")):
            if keep is not None and raw["method"] not in keep:
                continue
            row = {k: (raw[k] if k in ("method", "frozen") else float(raw[k]) if raw[k] not in ("", None) else math.nan)
                   for k in raw}
            rows[(row["method"], row["seed"], row.get("frozen"))] = row
            if row.get("frozen", "False") == "False":
                learned_seeds.setdefault(row["method"], []).append(row["seed"])
        beside = Path(path).with_name(Path(path).stem + "_curves.json")
        for name, runs in (json.loads(beside.read_text()) if beside.exists() else {}).items():
            # one curve per seed in the CSV's order (older files: the first seed's only)
            runs = [runs] if runs and not isinstance(runs[0], list) else runs
            by_seed.update({(name, seed): curve for seed, curve in zip(learned_seeds.get(name, []), runs)})
    curves: dict[str, list[list[float]]] = {}
    for (name, _), curve in sorted(by_seed.items(), key=lambda item: item[0][1]):
        curves.setdefault(name, []).append(curve)
    return list(rows.values()), curves


def merge_tables(args) -> int:
    """Rebuild the Markdown tables from CSVs of split runs (e.g. one process per seed)."""
    rows, curves = merge_runs(args.merge)
    learning = [r for r in rows if r["frozen"] == "False"]
    frozen = [r for r in rows if r["frozen"] == "True"]
    seeds = sorted({int(r["seed"]) for r in rows})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or "merged"
    header = f"Quality ({tag}, merged from {len(args.merge)} runs; seeds {seeds}): mean ± std [min-max]"
    table = write_tables(out, tag, learning, frozen, header, "Frozen router", args.floor_batches, curves)
    (out / f"quality_{tag}_curves.json").write_text(json.dumps(curves))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
