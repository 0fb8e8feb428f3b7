"""Reference tables whose source is the code, written into README.md and docs/*.md.

``python -m moe_balance docs`` re-renders every block between markers such as::

    <!-- generated:config -->
    ...
    <!-- end generated -->

and ``tests/test_docs.py`` fails when a committed page differs from what the code generates, so the
configuration reference, the architecture lists and the metric names cannot drift from the code.

Sources: allowed values and bounds are read from the checks in ``BalanceConfig.validate`` (the one place
that enforces them), meanings from the fields' attribute docstrings, architectures from the patching
registry, metric names from a real ``Balancer.metrics()``.

Example:
    >>> page = "intro\\n<!-- generated:architectures-line -->\\nstale\\n<!-- end generated -->\\nrest\\n"
    >>> fresh = render_page(page)
    >>> fresh.startswith("intro\\n<!-- generated:architectures-line -->\\n"), "stale" in fresh
    (True, False)
    >>> render_page(fresh) == fresh
    True
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import config as config_module

PAGES = ("README.md", "docs/*.md")
BLOCK = re.compile(r"(<!-- generated:([\w-]+) -->\n)(.*?)(<!-- end generated -->)", re.S)
COMMAND = "python -m moe_balance docs"


# ---------------------------------------------------------------- configuration
def _class_node(module: Any, name: str) -> ast.ClassDef:
    tree = ast.parse(inspect.getsource(module))
    return next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name)


def _attribute_docstrings(cls: ast.ClassDef) -> dict[str, str]:
    """A field's docstring is the string literal right after its annotated assignment (PEP 257)."""
    docs = {}
    for node, after in zip(cls.body, cls.body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _validation_rules(cls: ast.ClassDef) -> dict[str, str]:
    """What ``validate`` accepts per field, read from its ``_choice``/``_number`` calls and bool loop."""
    validate = next(node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == "validate")
    rules: dict[str, str] = {}
    for node in ast.walk(validate):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_choice":
            name, allowed = node.args[0].value, getattr(config_module, node.args[2].id)
            rules.setdefault(name, ", ".join(f"`{value}`" for value in allowed))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_number":
            bounds = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
            rules.setdefault(node.args[0].value, _describe_number(**bounds))
        elif (isinstance(node, ast.For) and isinstance(node.iter, ast.Tuple)
              and any(isinstance(sub, ast.Name) and sub.id == "bool" for sub in ast.walk(node))):
            for element in node.iter.elts:
                rules.setdefault(element.value, "`True`, `False`")
    return rules


def _describe_number(low: float | None = None, high: float | None = None, low_open: bool = False,
                     high_open: bool = False, integer: bool = False) -> str:
    kind = "integer" if integer else "number"
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high:g}"
    return kind


def _first_sentence(text: str) -> str:
    sentence = re.split(r"(?<=[.])\s+(?=[A-Z`(])", " ".join(text.split()), maxsplit=1)[0]
    return sentence.replace("``", "`")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a pipe ends a table cell even inside a code span


def config_reference() -> list[dict[str, str]]:
    """One row per ``BalanceConfig`` field: name, default, allowed values, meaning."""
    cls = _class_node(config_module, "BalanceConfig")
    docs, rules = _attribute_docstrings(cls), _validation_rules(cls)
    rows, missing = [], []
    for field in dataclasses.fields(config_module.BalanceConfig):
        if field.name not in docs or field.name not in rules:
            missing.append(field.name)
            continue
        allowed = rules[field.name]
        if field.default is None:
            allowed = f"`None` or {allowed}"
        elif isinstance(field.default, tuple):
            allowed = f"non-empty list, each a {allowed}"
        rows.append({"field": field.name, "default": repr(field.default), "allowed": allowed,
                     "meaning": _first_sentence(docs[field.name])})
    if missing:
        raise ValueError(f"BalanceConfig fields without an attribute docstring or a check in validate(): {missing}")
    return rows


def config_table() -> str:
    lines = ["| field | default | allowed | meaning |", "|---|---|---|---|"]
    lines += [f"| `{row['field']}` | `{row['default']}` | {_cell(row['allowed'])} | {_cell(row['meaning'])} |"
              for row in config_reference()]
    return "\n".join(lines)


# ---------------------------------------------------------------- architectures
STRATEGIES = {
    "generic": "the router calls `torch.topk` over its experts; a `TorchFunctionMode` active only during that "
               "router's forward replaces it by `topk(x + b).indices` and gathers the unbiased values",
    "group_limited": "excluded expert groups stay excluded; the bias acts inside the chosen groups",
    "native_bias": "the router owns `e_score_correction_bias`; an fp32 master is written into it after each step, "
                   "so stock transformers serves the trained bias from the checkpoint",
}
# Names a reader looks for first; each must stay in the registry (checked when rendering).
HIGHLIGHTS = ("mixtral", "qwen3_moe", "qwen3_next", "deepseek_v3", "gpt_oss", "llama4_text", "olmoe", "glm4_moe")


def _registry() -> Any:
    from .patching import registry
    return registry


def architectures_line() -> str:
    registry = _registry()
    supported = registry.supported_architectures()
    absent = [name for name in HIGHLIGHTS if name not in supported]
    if absent:
        raise ValueError(f"docgen.HIGHLIGHTS names architectures the registry no longer supports: {absent}")
    return (f"**{len(supported)} transformers architectures** ({', '.join(HIGHLIGHTS)}, ...) and DeepSpeed's "
            f"`TopKGate`; {len(registry.unsupported_architectures())} more are recognised and refused with the "
            f"reason. Full list: [docs/architectures.md](docs/architectures.md).")


def architectures_lists() -> str:
    registry = _registry()
    by_strategy: dict[str, list[str]] = {}
    for model_type, strategy in registry.supported_architectures().items():
        by_strategy.setdefault(strategy, []).append(model_type)
    unknown = sorted(set(by_strategy) - set(STRATEGIES))
    if unknown:
        raise ValueError(f"strategies without a description in docgen.STRATEGIES: {unknown}")
    total = sum(map(len, by_strategy.values()))
    lines = [f"{total} architectures are verified:", ""]
    for strategy, note in STRATEGIES.items():
        names = by_strategy.get(strategy, [])
        lines.append(f"* **{strategy}** ({len(names)}; {note}): {', '.join(names)}")
    lines += ["", _releases_table()]
    lines += ["", "| not patched | why |", "|---|---|"]
    lines += [f"| {name} (unsupported) | {_cell(reason)} |" for name, reason in
              registry.unsupported_architectures().items()]
    lines += [f"| {name} (unverified) | {_cell(reason)} |" for name, reason in sorted(registry.UNVERIFIED.items())]
    return "\n".join(lines)


def _releases_table() -> str:
    """Per model type, the transformers releases it is verified on (``moe_balance.patching.versions``)."""
    from .patching import versions
    tested = versions.TESTED
    lines = ["Verified on the transformers releases of the compatibility stage (`.ci/compat`); on any other "
             "release each router is compared with its stock forward at a zero bias on the model's first forward "
             "and refused if it differs:", "",
             "| model type | " + " | ".join(tested) + " |", "|---|" + "---|" * len(tested)]
    for model_type in sorted(_registry().supported_architectures()):
        cells = []
        for release in tested:
            if model_type in versions.VERIFIED.get(release, ()):
                cells.append("✅")
            elif (model_type, release) in versions.BROKEN:
                cells.append("upstream bug")
            else:
                cells.append("")
        lines.append(f"| {model_type} | " + " | ".join(cells) + " |")
    lines += ["", "Empty: the release has no such model type. " + "; ".join(
        f"{t} on {r}: {_cell(why)}" for (t, r), why in sorted(versions.BROKEN.items())) + "."]
    return "\n".join(lines)


# ---------------------------------------------------------------- metrics
# meaning, and when the key is present (None: always).
METRICS: dict[str, tuple[str, str | None]] = {
    "maxvio_global": ("max load / mean load - 1 over the step window (all micro-batches and ranks)", None),
    "maxvio_batch": ("the same per micro-batch, averaged", None),
    "cv": ("coefficient of variation of the expert loads", None),
    "load_entropy": ("entropy of the loads over log(experts): 1 = even", None),
    "dead_experts": ("experts with no token in the window, summed over layers", None),
    "min_max_ratio": ("least loaded over most loaded expert", None),
    "dropped@<cf>": ("share of assignments over capacity `ceil(cf*T*k/E)`, one per `capacity_factors` entry", None),
    "bias_abs_mean": ("mean \\|bias\\| over layers and experts", None),
    "bias_abs_max": ("largest \\|bias\\|", None),
    "aux_loss": ("auxiliary loss, summed over layers, mean over micro-batches", None),
    "z_loss": ("router z-loss, summed over layers, mean over micro-batches", None),
    "aux_coef": ("current aux-loss coefficient (moves with `adaptive_aux`)", None),
    "tokens": ("valid tokens in the window (padding excluded)", None),
    "skipped_tokens": ("tokens excluded for non-finite router logits (`nan_policy`)", None),
    "bias_step_share": ("share of the quantile price move applied this step, mean over layers (`quantile_step="
                        "'filtered'`): 1 while the price really moves, small once the moves are mostly one batch's "
                        "sampling noise", "`bias_update='quantile'` with the default `quantile_step`"),
    "bias_flip_share": ("share of experts whose bias move reversed direction this step: an oscillating "
                        "controller", None),
    "maxvio_layer_median": ("median over layers of the window MaxVio", None),
    "maxvio_layer_p95": ("95th percentile over layers", None),
    "maxvio_layer_max": ("worst layer's MaxVio", None),
    "maxvio_worst_layer": ("index of that layer", None),
    "ep_imbalance": ("busiest expert-parallel rank's load over the mean, minus 1 (that rank sets the step time), "
                     "mean over layers", "`expert_parallel_size` > 1"),
    "ep_imbalance_max": ("the same, worst layer", "`expert_parallel_size` > 1"),
    "capacity_dropped": ("share the router itself dropped at capacity", "routers that report drops (DeepSpeed "
                         "`TopKGate`)"),
    "routing_differ": ("share of tokens whose experts differ from what the same weights choose without the bias: "
                       "what a stock load of the current weights (vLLM, a mid-run checkpoint) would route otherwise",
                       None),
    "fold_fit": ("share of a constant the router inputs explain (`mu . v`, mean over layers): how exactly the online "
                 "fold moves the bias into the weights", "the online fold (`fold_share` > 0)"),
    "fold_moved_abs_max": ("largest per-expert logit shift the online fold moved into the router weights at the "
                           "last step: the price the controller set (with `fold_share=1` the bias itself stays 0)",
                           "the online fold (`fold_share` > 0)"),
    "layer<i>/<name>": ("per-layer values", "`log_per_layer`"),
}


def _metric_names(everything: bool) -> tuple[list[str], list[str]]:
    """Keys of a real two-layer Balancer after one step (per-layer and capacity keys folded to patterns);
    ``everything``: with every optional key switched on."""
    import torch
    from .balancer import Balancer
    fields = {"expert_parallel_size": 2, "log_per_layer": True} if everything else {}
    balancer = Balancer(num_layers=2, num_experts=4, top_k=2, bias_update="quantile" if everything else "sign",
                        router_dim=3 if everything else None,
                        **fields)
    logits = torch.linspace(-1.0, 1.0, 32).reshape(8, 4)
    for layer in range(2):
        balancer.observe(layer, logits, logits.topk(2).indices, dropped=torch.tensor(0.1) if everything else None,
                         router_input=torch.ones(8, 3) if everything else None,
                         selection_scores=logits if everything else None)
    balancer.step()
    names, per_layer = [], []
    for key in balancer.metrics():
        key = re.sub(r"dropped@[\d.e+-]+$", "dropped@<cf>", key)
        if key.startswith("layer"):
            per_layer.append(key.split("/", 1)[1])
            key = "layer<i>/<name>"
        if key not in names:
            names.append(key)
    return names, sorted(set(per_layer))


def metrics_table() -> str:
    always, _ = _metric_names(everything=False)
    every, per_layer = _metric_names(everything=True)
    wrong = ([name for name in every if name not in METRICS]
             + [name for name in METRICS if name not in every]
             + [name for name in every if (METRICS.get(name, ("", None))[1] is None) != (name in always)])
    if wrong:
        raise ValueError(f"docgen.METRICS disagrees with Balancer.metrics() on: {sorted(set(wrong))}")
    lines = ["| key | meaning | present |", "|---|---|---|"]
    for name in METRICS:
        meaning, condition = METRICS[name]
        if name == "layer<i>/<name>":
            meaning = f"{meaning}: {', '.join(f'`{key}`' for key in per_layer)}"
        lines.append(f"| `{name}` | {meaning} | {condition or 'always'} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- pages
GENERATORS: dict[str, Callable[[], str]] = {
    "config": config_table,
    "architectures-line": architectures_line,
    "architectures": architectures_lists,
    "metrics": metrics_table,
}


def render_page(text: str, cache: dict[str, str] | None = None) -> str:
    """``text`` with every generated block re-rendered; an unknown block name raises."""
    cache = {} if cache is None else cache

    def fill(match: re.Match) -> str:
        name = match.group(2)
        if name not in GENERATORS:
            raise ValueError(f"unknown generated block {name!r}; known: {sorted(GENERATORS)}")
        if name not in cache:
            cache[name] = GENERATORS[name]()
        return f"{match.group(1)}{cache[name]}\n{match.group(4)}"

    return BLOCK.sub(fill, text)


def pages(root: str | Path = ".") -> list[Path]:
    root = Path(root)
    return sorted(path for pattern in PAGES for path in root.glob(pattern))


def stale(root: str | Path = ".") -> list[Path]:
    """Pages whose generated blocks differ from what the code generates now."""
    cache: dict[str, str] = {}
    return [path for path in pages(root) if render_page(text := path.read_text(), cache) != text]


def write(root: str | Path = ".") -> list[Path]:
    """Re-render every page's generated blocks in place; return the pages that changed."""
    cache: dict[str, str] = {}
    changed = []
    for path in pages(root):
        text = path.read_text()
        fresh = render_page(text, cache)
        if fresh != text:
            path.write_text(fresh)
            changed.append(path)
    return changed


__all__ = ["COMMAND", "config_reference", "config_table", "architectures_line", "architectures_lists",
           "metrics_table", "render_page", "pages", "stale", "write"]
