"""Fine-tuning benchmark: what a user ships after balancing a downloaded checkpoint.

    python benchmarks/finetune.py                      # 4 seeds, every row (see docs/benchmarks.md for wall time)
    python benchmarks/finetune.py --seeds 1 --steps 40 --methods none,default   # smoke

A tiny Qwen3-MoE (quick shape: hidden 64, 4 layers, 16 experts, top-2) is pretrained on general
stdlib sources with a global-batch aux loss (its routers balanced by their own weights, like a
downloaded checkpoint), saved, then fine-tuned on a narrow domain (stdlib email, http, xml, html,
urllib; every 5th file of that domain held out). Every row starts from the same saved checkpoint and
sees the same batches. Columns, each with the balancer on ("patched") and the saved folder loaded by
stock transformers ("stock"): domain val loss, MaxVio on the held-out files and on unseen batches drawn
like the training batches; each split's price floor (quantile rows: the exact price of fresh training
batches for the final router, nothing learning); per-layer top-k agreement of stock with patched; loss on
the general held-out set (forgetting). Mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/finetune.py` from anywhere

import moe_balance as mb  # noqa: E402
from benchmarks.quality import (SERVED_KEYS_FINETUNE, exact_price, merge_runs, paired_table,  # noqa: E402
                                stretch_table)
from moe_balance import export  # noqa: E402
from moe_balance.testing import batches, stdlib_corpus, stdlib_files, tiny_model  # noqa: E402

DOMAIN = ("email", "http", "xml", "html", "urllib")
# name -> (BalanceConfig fields or None for no balancer, transformers' router_aux_loss_coef or None, fold at end)
METHODS: dict[str, tuple[dict | None, float | None, bool]] = {
    "none": (None, None, False),
    "hf_aux_1e-3": (None, 1e-3, False),  # what TRL turns on by default: transformers' pooled loss
    "global_batch_1e-2": ({"bias_update": "none", "aux_loss": "global_batch", "aux_loss_coef": 1e-2}, None, False),
    "sign_1e-3": ({"bias_update": "sign"}, None, False),
    # the bias beside the weights: its patched column is the bias-only reference; served, the bias is dropped
    "quantile_no_fold": ({"fold_share": 0.0}, None, False),
    "quantile_end_fold": ({"fold_share": 0.0}, None, True),  # folded once at the end (calibration CG)
    "default": ({}, None, True),  # quantile, the whole bias folded into the router weights every step
    "fold_0.1": ({"fold_share": 0.1}, None, True),  # a tenth per step; the remainder folded at the end
    "fold_0.03": ({"fold_share": 0.03}, None, True),
    "fold_0.3": ({"fold_share": 0.3}, None, True),
    # LoRA-like: routers frozen during the fine-tune (no gradient); the online fold still edits them
    "frozen_none": (None, None, False),
    "frozen_default": ({}, None, True),
}
SHAPE = dict(experts=16, top_k=2, vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def domain_corpus(split: str) -> torch.Tensor:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in stdlib_files() if p.relative_to(root).parts[0] in DOMAIN]
    chosen = [p for i, p in enumerate(files) if (i % 5 == 0) == (split == "val")]
    blob = b"".join(p.read_bytes() for p in chosen)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).long()


def pretrained(seed: int, cache: Path, steps: int, general: torch.Tensor) -> Path:
    """A balanced checkpoint: pretrained with a global-batch aux loss, saved like a download."""
    folder = cache / f"pretrained_s{seed}_{steps}"
    if (folder / "config.json").exists():
        return folder
    model = tiny_model("qwen3_moe", seed=seed, **SHAPE)
    balancer = mb.patch(model, bias_update="none", aux_loss="global_batch", aux_loss_coef=1e-2, attach_loss=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stream = batches(general, 16, 64, seed=1000 + seed)
    for _ in range(steps):
        ids = next(stream)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step(), optimizer.zero_grad(), balancer.step()
    mb.unpatch(model)
    model.save_pretrained(folder)
    return folder


def load(folder: Path, hf_coef: float | None = None):
    from transformers import AutoModelForCausalLM
    extra = {"output_router_logits": True, "router_aux_loss_coef": hf_coef} if hf_coef else {}
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", **extra)


def eval_batches(data: torch.Tensor, n: int, seed: int) -> list[torch.Tensor]:
    stream = batches(data, 16, 128, seed=seed)
    return [next(stream) for _ in range(n)]


def split_floors(model, balancer, pool: list[torch.Tensor], splits: list[list[torch.Tensor]], iters: int
                 ) -> list[float]:
    """The price floor of each evaluation split for the router as it stands: MaxVio (mean over layers, the
    split's batches pooled, as the table measures) under the exact price of ``pool``, training batches no
    split holds. No bias estimated from training data does better on a split; how close a split sits to its
    floor says how much room it leaves to tell methods apart. (A price fitted on a split itself balances it
    almost exactly, in-sample, so that is no floor.) Sets the balancer's bias: call after everything else is
    measured."""
    exact_price(model, balancer, pool, iters)
    return [statistics.mean(export.routing_report(model, split)["maxvio_L"]) for split in splits]


def run_one(name: str, seed: int, args, base: Path, train, val, general_val) -> dict:
    fields, hf_coef, fold = METHODS[name]
    model = load(base, hf_coef)
    # Without a balancer of its own, a measuring-only patch reads the routing (bit-identical to stock).
    balancer = mb.patch(model, fields if fields is not None else {"bias_update": "none"}, attach_loss=True)
    if name.startswith("frozen"):
        for site in mb.patching.patch_state_of(model).sites:
            site.module.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    stream = batches(train, 16, 64, seed=seed)
    curve, differ = [], []
    for _ in range(args.steps):
        ids = next(stream)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step(), optimizer.zero_grad(), balancer.step()
        metrics = balancer.metrics()
        curve.append(metrics["maxvio_global"])
        differ.append(metrics["routing_differ"])
    val_b, gen_b = eval_batches(val, args.eval_batches, 1234), eval_batches(general_val, args.eval_batches, 99)
    # unseen batches drawn like the training batches (same files, windows the run did not take)
    like_b = eval_batches(train, args.eval_batches, 4321)
    trained = export.routing_report(model, val_b)  # the model as trained: patched, with its bias
    trained_like = export.routing_report(model, like_b)
    row = {"method": name, "seed": seed, "steps": args.steps, "bias_abs_mean": float(balancer.bias_LE.abs().mean()),
           "routing_differ_last10": statistics.mean(differ[-10:]),
           "fold_fit": balancer.metrics().get("fold_fit", math.nan)}
    if fold:
        shipped = export.ship(model, [next(stream) for _ in range(args.fold_batches)])
        row["end_fold_agreement"] = shipped["topk_agreement"]
    with tempfile.TemporaryDirectory() as tmp:
        export.save_pretrained(model, tmp)
        stock = load(Path(tmp))
        mb.patch(stock, bias_update="none", selftest=False)
        served = export.routing_report(stock, val_b)
        served_like = export.routing_report(stock, like_b)
        general = export.routing_report(stock, gen_b)
    shares = export.agreement(trained["selections"], served["selections"])
    row.update({"val_patched": trained["loss"], "val_stock": served["loss"],
                "maxvio_patched": statistics.mean(trained["maxvio_L"]),
                "maxvio_stock": statistics.mean(served["maxvio_L"]),
                "maxvio_like_patched": statistics.mean(trained_like["maxvio_L"]),
                "maxvio_like_stock": statistics.mean(served_like["maxvio_L"]),
                "agreement_min": min(shares), "agreement_mean": statistics.mean(shares),
                "general_stock": general["loss"]})
    # Each split's floor for this run's final router (the bias-only row's is the one to read against).
    with_price = fields is not None and balancer.config.uses_quantile and args.floor_iters > 0
    floors = (split_floors(model, balancer, eval_batches(train, args.eval_batches, 777), [val_b, like_b],
                           args.floor_iters) if with_price else [math.nan, math.nan])
    row["floor_heldout"], row["floor_like"] = floors
    row["_curve"] = curve
    return row


COLS = [("val loss patched", "val_patched", 4), ("val loss stock", "val_stock", 4),
        ("MaxVio patched", "maxvio_patched", 2), ("MaxVio stock", "maxvio_stock", 2),
        ("MaxVio patched, train-like batches", "maxvio_like_patched", 2),
        ("MaxVio stock, train-like batches", "maxvio_like_stock", 2),
        ("routing differs (last 10 steps)", "routing_differ_last10", 3),
        ("price floor, held-out", "floor_heldout", 2), ("price floor, train-like", "floor_like", 2),
        ("top-k agreement (min layer)", "agreement_min", 3), ("general loss stock", "general_stock", 4),
        ("mean abs bias", "bias_abs_mean", 4)]


def cell(values: list[float], digits: int) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "-"
    sd = statistics.pstdev(finite) if len(finite) > 1 else 0.0
    return f"{statistics.mean(finite):.{digits}f} ± {sd:.{digits}f}"


def table(rows: list[dict]) -> str:
    names = list(dict.fromkeys(r["method"] for r in rows))
    seeds = len({r["seed"] for r in rows})
    lines = [f"| method ({seeds} seeds, mean ± std) | " + " | ".join(c[0] for c in COLS) + " |",
             "|---" * (len(COLS) + 1) + "|"]
    for name in names:
        mine = [r for r in rows if r["method"] == name]
        lines.append(f"| {name} | " + " | ".join(cell([r[k] for r in mine], d) for _, k, d in COLS) + " |")
    return "\n".join(lines) + "\n"


LABELS = {"none": "none", "hf_aux_1e-3": "HF aux 1e-3", "global_batch_1e-2": "global-batch aux",
          "sign_1e-3": "sign, bias dropped", "quantile_no_fold": "quantile, bias dropped",
          "quantile_end_fold": "quantile + end fold", "default": "default (online fold 1.0)",
          "fold_0.1": "online fold 0.1", "fold_0.03": "online fold 0.03", "fold_0.3": "online fold 0.3",
          "frozen_none": "frozen router", "frozen_default": "frozen + online fold"}


def figure(rows: list[dict], path: Path) -> Path:
    """MaxVio while training (patched) and as served (stock) per method, mean ± std over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in dict.fromkeys(r["method"] for r in rows)]
    stats = {}
    for name in names:
        mine = [r for r in rows if r["method"] == name]
        stats[name] = [(statistics.mean(float(r[k]) for r in mine), statistics.pstdev([float(r[k]) for r in mine]))
                       for k in ("maxvio_patched", "maxvio_stock")]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    x = range(len(names))
    for offset, (label, index, color) in enumerate((("while training (patched)", 0, "#9ab"),
                                                    ("as served (stock transformers)", 1, "#c33"))):
        ax.bar([i + (offset - 0.5) * 0.38 for i in x], [stats[n][index][0] for n in names], 0.38,
               yerr=[stats[n][index][1] for n in names], label=label, color=color, capsize=2)
    ax.set_xticks(list(x), [LABELS.get(n, n) for n in names], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("held-out MaxVio (lower is better)")
    seeds = len({r["seed"] for r in rows})
    ax.set_title(f"Fine-tuning a balanced checkpoint: balance of the model you ship ({seeds} seeds)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--fold-batches", type=int, default=16)
    p.add_argument("--floor-iters", type=int, default=20,
                   help="quantile rows: price iterations for each split's price floor (0 = skip)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="finetune")
    p.add_argument("--cache", default="runs/finetune_cache")
    p.add_argument("--plot", metavar="CSV", help="only draw the figure of a finished run's CSV")
    p.add_argument("--merge", nargs="+", metavar="CSV",
                   help="only merge finished runs (their CSVs and the _curves.json beside each, e.g. one process "
                        "per pair of seeds) into --out/--tag tables")
    args = p.parse_args(argv)
    if args.plot:
        rows = list(csv.DictReader(open(args.plot)))
        print(figure(rows, Path(args.plot).with_suffix(".png")))
        return 0
    if args.merge:
        # --methods picks rows; a later file replaces the rows of the same method and seed
        rows, curves = merge_runs(args.merge, keep=set(args.methods.split(",")))
        print(write(rows, curves, Path(args.out), args.tag))
        return 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    general, _ = stdlib_corpus(max_bytes=2_000_000)
    general_val, _ = stdlib_corpus(max_bytes=400_000, split="val")
    train, val = domain_corpus("train"), domain_corpus("val")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown --methods {unknown}; choose from {list(METHODS)}")
    out, rows, curves = Path(args.out), [], {}
    out.mkdir(parents=True, exist_ok=True)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        base = pretrained(seed, Path(args.cache), args.pretrain_steps, general)
        for name in methods:
            row = run_one(name, seed, args, base, train, val, general_val)
            curves.setdefault(name, []).append(row.pop("_curve"))
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    print(write(rows, curves, out, args.tag))
    return 0


def write(rows: list[dict], curves: dict[str, list[list[float]]], out: Path, tag: str) -> str:
    """CSV, curves JSON, the Markdown tables and the figure under ``out/tag``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{tag}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader(), writer.writerows(rows)
    (out / f"{tag}_curves.json").write_text(json.dumps(curves))
    text = (table(rows) + "\nPaired by seed (served = stock load)\n\n" + paired_table(rows, SERVED_KEYS_FINETUNE)
            + "\nTraining-window MaxVio per tenth of the run (mean over seeds)\n\n" + stretch_table(curves))
    (out / f"{tag}.md").write_text(text)
    figure(rows, out / f"{tag}.png")
    return text


if __name__ == "__main__":
    sys.exit(main())
