"""Command line: ``python -m moe_balance {inspect,plot,architectures,docs,check-export}``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _meta_model(target: str):
    """The model skeleton on the meta device (no weights read or allocated) and where its config came from.

    A model_type is described with transformers' default config for it (the real architecture:
    meta tensors cost nothing); the tiny test config is only the fallback when that cannot be built.
    """
    from ._optional import require
    transformers = require("transformers")
    if Path(target).exists():
        return _build_on_meta(transformers.AutoConfig.from_pretrained(target)), f"config of {target}"
    try:
        return _build_on_meta(transformers.AutoConfig.for_model(target)), f"transformers' default {target} config"
    except Exception as error:  # any failure of the default config falls back to the tiny one, saying why
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:160]
    from .testing import tiny_config
    note = f"the tiny test config of {target} (2 layers), because its default config could not be built ({reason})"
    return _build_on_meta(tiny_config(target)), note


def _build_on_meta(config):
    import torch
    import transformers
    with torch.device("meta"):
        try:
            return transformers.AutoModelForCausalLM.from_config(config)
        except ValueError:
            return transformers.AutoModel.from_config(config)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .patching import api, registry
    model, source = _meta_model(args.target)
    model_type = api.model_type_of(model)
    found = api.find_routers(model)
    print(f"model: {type(model).__name__} (model_type={model_type!r})")
    print(f"built from {source}, on the meta device")
    if model_type in registry.UNSUPPORTED:
        print(f"unsupported: {registry.UNSUPPORTED[model_type]}")
    header = f"{'layer':>5}  {'module':<40} {'router class':<28} {'experts':>7} {'top_k':>5}  {'scoring':<8} strategy"
    print(header)
    print("-" * len(header))
    layer = 0
    for info in found:
        index = str(layer) if info["strategy"] else "-"
        layer += info["strategy"] is not None
        print(f"{index:>5}  {info['name']:<40} {info['class']:<28} {info['num_experts'] or '?':>7} "
              f"{info['top_k'] or '?':>5}  {info['score_func']:<8} {info['strategy'] or 'not patchable'}")
    print(f"{layer} MoE layer(s) would be balanced" if layer and model_type not in registry.UNSUPPORTED
          else "no router would be patched")
    return 0 if layer and model_type not in registry.UNSUPPORTED else 1


def cmd_architectures(args: argparse.Namespace) -> int:
    from .patching import registry
    for model_type, strategy in registry.supported_architectures().items():
        print(f"{model_type:<20} {strategy}")
    for model_type, reason in registry.unsupported_architectures().items():
        print(f"{model_type:<20} unsupported: {reason}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_run
    out = plot_run(args.run_dir, args.output)
    print(f"wrote {out}")
    return 0


def cmd_docs(args: argparse.Namespace) -> int:
    from . import docgen
    if args.check:
        stale = docgen.stale(args.root)
        for path in stale:
            print(f"out of date: {path} (run `{docgen.COMMAND}`)")
        return 1 if stale else 0
    for path in docgen.write(args.root):
        print(f"wrote {path}")
    return 0


def cmd_check_export(args: argparse.Namespace) -> int:
    from . import export
    data = export.text_batches(args.saved, args.text, batches=args.batches, batch_size=args.batch_size,
                               seq_len=args.seq_len)
    result = export.check_export(args.saved, data)
    print(f"{'layer':>5} {'top-k agreement':>16} {'MaxVio trained':>15} {'MaxVio stock':>13}")
    for layer, (share, mv_t, mv_s) in enumerate(zip(result["topk_agreement_L"], result["maxvio_trained_L"],
                                                    result["maxvio_stock_L"])):
        print(f"{layer:>5} {share:>16.4f} {mv_t:>15.3f} {mv_s:>13.3f}")
    print(f"loss trained {result['loss_trained']:.4f}  stock {result['loss_stock']:.4f}  "
          f"(diff {result['loss_diff']:+.4f})  MaxVio trained {result['maxvio_trained']:.3f}  "
          f"stock {result['maxvio_stock']:.3f}  min agreement {result['topk_agreement_min']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    # Shipped = as balanced and as good as trained; the exact choices may differ where the end fold moved what
    # the online fold had not yet (the last steps' price noise).
    problems = []
    if result["maxvio_stock"] > args.max_maxvio_ratio * result["maxvio_trained"] + 0.02:
        problems.append(f"served MaxVio {result['maxvio_stock']:.3f} > {args.max_maxvio_ratio:g} x trained "
                        f"{result['maxvio_trained']:.3f} + 0.02")
    if result["loss_diff"] > args.max_loss_increase:
        problems.append(f"served loss {result['loss_diff']:+.4f} nats over trained (> {args.max_loss_increase:g})")
    if result["topk_agreement_min"] < args.min_agreement:
        problems.append(f"top-k agreement {result['topk_agreement_min']:.4f} < {args.min_agreement:g}")
    print("shipped: as balanced as trained" if not problems else "NOT shipped as trained: " + "; ".join(problems))
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_balance", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="list the MoE routers of a checkpoint folder or model_type")
    p.add_argument("target", help="a checkpoint folder (config.json) or a transformers model_type")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("architectures", help="supported and unsupported model types")
    p.set_defaults(func=cmd_architectures)
    p = sub.add_parser("plot", help="render a run's balance stats (moe_balance_stats.jsonl) to a PNG")
    p.add_argument("run_dir")
    p.add_argument("-o", "--output", default="balance.png")
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("docs", help="regenerate the reference tables in README.md and docs/ from the code")
    p.add_argument("--root", default=".", help="the repository root (default: the current directory)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is out of date")
    p.set_defaults(func=cmd_docs)
    p = sub.add_parser("check-export", help="does a saved folder, loaded by stock transformers, route as trained?")
    p.add_argument("saved", help="a folder written by moe_balance.export.save_pretrained or a Trainer checkpoint")
    p.add_argument("--text", nargs="*", help="text files to route (default: the stdlib's held-out sources)")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-maxvio-ratio", type=float, default=1.1,
                   help="exit 1 when the served MaxVio exceeds this times the trained one, plus 0.02 (default 1.1)")
    p.add_argument("--max-loss-increase", type=float, default=0.003,
                   help="exit 1 when the served loss exceeds the trained one by more (nats, default 0.003)")
    p.add_argument("--min-agreement", type=float, default=0.0,
                   help="exit 1 when a layer's top-k agreement is below this (default 0: not checked)")
    p.add_argument("--json", help="also write the full result here")
    p.set_defaults(func=cmd_check_export)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
