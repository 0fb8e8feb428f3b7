"""Which strategy patches which router: per-``model_type`` table plus user registrations."""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

import torch

# model_type -> strategy, for the architectures checked by tests/test_patching.py (each is built
# from a tiny config there and must match, bit for bit, its unpatched twin).
MODEL_TYPES: dict[str, str] = {
    "mixtral": "generic", "qwen2_moe": "generic", "qwen3_moe": "generic", "qwen3_next": "generic",
    "olmoe": "generic", "flex_olmo": "generic", "granitemoe": "generic", "granitemoeshared": "generic",
    "granitemoehybrid": "generic", "jamba": "generic", "gpt_oss": "generic", "llama4_text": "generic",
    "minimax": "generic", "minimax_m2": "generic", "hunyuan_v1_moe": "generic", "ernie4_5_moe": "generic",
    "lfm2_moe": "generic",
    "afmoe": "generic", "cohere2_moe": "generic", "granitemoe_swa": "generic", "hy_v3": "generic",
    "lara_mini": "generic", "mellum": "generic",
    "deepseek_v2": "group_limited",
    "deepseek_v3": "native_bias", "glm4_moe": "native_bias", "glm4_moe_lite": "native_bias",
    "glm_moe_dsa": "native_bias", "dots1": "native_bias", "longcat_flash": "native_bias",
    "exaone_moe": "native_bias", "hy_v4": "native_bias", "kolibri1": "native_bias", "laguna": "native_bias",
    "mimo_v2_flash": "native_bias", "nemotron_h": "native_bias", "solar_open": "native_bias",
    "axk2": "native_bias",
    "qwen3_5_moe_text": "generic", "qwen3_5_moe": "generic", "gemma4_text": "generic", "gemma4": "generic",
    "qwen4_exp_text": "generic", "qwen4_exp": "generic",
    "deepseek_v32": "native_bias", "kimi_linear": "native_bias", "bailing_hybrid": "native_bias", "axk1": "native_bias",
    "dots3_note_text": "native_bias", "beam": "native_bias", "flint": "generic",
    "ergo": "native_bias", "kolibri1_1": "native_bias", "minicpm5_moe": "native_bias", "llama4": "generic",
    "jetmoe": "generic",
}

# model_type -> why it is not patched (yet); patch() raises with this text.
UNSUPPORTED: dict[str, str] = {
    "phimoe": "PhiMoE routes with sparsemixer (masked sampling, no top-k call); register an adapter",
    "dbrx": "DBRX's router returns logits only; experts are chosen in DbrxFFN.route_tokens_to_experts",
    "switch_transformers": "Switch routes by argmax with capacity inside the router; no top-k call",
    "nllb_moe": "NLLB-MoE routes by argmax/top-2 with capacity inside the router; no plain top-k call",
    "doge": "Doge's CDMoE picks experts by product keys (a top-k over each of two key sets, then over their sums): "
            "no single top-k over the experts for a bias to act on",
    "zaya": "ZAYA's top-1 router makes no top-k call over its experts",
    "deepseek_v4": "its first MoE layers route by a fixed token-id table (DeepseekV4HashRouter: no selection to "
                   "bias) and the others score experts with sqrtsoftplus, which the balance losses do not model",
    "dots3_note": "the multimodal Dots3NoteForConditionalGeneration also routes its vision tower through MoE "
                  "layers (Dots3NoteVisionTopKRouter): they run only on images, so a text forward never reaches "
                  "them, and their shape (64 experts by default) differs from the language model's (256, top-8), "
                  "which one Balancer cannot hold; load the language model alone (AutoModelForCausalLM gives "
                  "dots3_note_text, which is verified)",
}

# MoE causal LMs of the installed transformers that patch() will try by auto-detection, but whose
# bit-exactness is not verified here; each reason says what blocks the check.
UNVERIFIED: dict[str, str] = {}

ROUTER_NAME = re.compile(r"(Router|Gate|Gating)$")

# Child names under which transformers 4.x sparse blocks keep a plain ``nn.Linear`` router (the block does the top-k).
GATE_CHILDREN = ("gate", "router")

# Fields that name a router's score function, on the router itself or on its config.
SCORE_FUNC_FIELDS = ("expert_selection_fn", "scoring_func", "score_func", "router_score_function",
                     "moe_router_score_function", "score_function")

# model_type (or transformers package) -> how the router scores experts over all its logits, read from
# its forward: softmax(logits), or sigmoid(logits) (normalised by the balancer's losses). Routers
# that take a softmax over their top-k logits only (gpt_oss, granitemoe*) are softmax routers: the
# renormalised top-k weights equal softmax(logits) gathered and renormalised.
_SOFTMAX = ("mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text", "olmoe",
            "flex_olmo", "granitemoe", "granitemoeshared", "granitemoehybrid", "granitemoe_swa", "jamba",
            "gpt_oss", "minimax", "hunyuan_v1_moe", "ernie4_5_moe", "lara_mini", "mellum", "deepseek_v2",
            "longcat_flash", "cohere2_moe", "jetmoe", "gemma4", "gemma4_text", "qwen4_exp", "qwen4_exp_text")
_SIGMOID = ("llama4", "llama4_text", "minimax_m2", "lfm2_moe", "afmoe", "hy_v3", "hy_v4", "deepseek_v3",
            "deepseek_v32", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "dots1", "exaone_moe", "kolibri1",
            "laguna", "mimo_v2_flash", "nemotron_h", "solar_open", "axk1", "axk2", "kimi_linear",
            "bailing_hybrid", "dots3_note", "dots3_note_text", "beam", "flint", "ergo", "kolibri1_1", "minicpm5_moe")
SCORE_FUNCS: dict[str, str] = {**dict.fromkeys(_SOFTMAX, "softmax"), **dict.fromkeys(_SIGMOID, "sigmoid")}


@dataclass
class RouterSpec:
    """How to read and patch one router class."""

    strategy: str
    num_experts: Callable[[torch.nn.Module], int] | None = None
    top_k: Callable[[torch.nn.Module], int] | None = None
    score_func: str | None = None


_REGISTERED: dict[type, RouterSpec] = {}

# Routers known by (module prefix, class name), so their libraries need not be imported here.
_BUILTIN_BY_NAME: dict[tuple[str, str], RouterSpec] = {
    ("deepspeed.moe", "TopKGate"): RouterSpec("deepspeed_gate", num_experts=lambda m: int(m.wg.out_features),
                                              top_k=lambda m: int(m.k), score_func="softmax"),
}


def register_router(router_cls: type, strategy: str = "generic", *, num_experts: Callable | str | None = None,
                    top_k: Callable | str | None = None, score_func: str | None = None) -> None:
    """Teach moe_balance a router class of your own (or override how a known one is patched).

    ``strategy`` is one of ``"generic"`` (the router calls ``topk`` over its experts),
    ``"group_limited"``, ``"deepspeed_gate"`` or ``"native_bias"`` (it adds an ``e_score_correction_bias`` buffer).
    ``num_experts``/``top_k`` are attribute names or callables of the router instance.

    Example:
        >>> import torch, moe_balance as mb
        >>> class MyRouter(torch.nn.Linear):
        ...     def forward(self, x):
        ...         logits = super().forward(x)
        ...         return logits, *torch.topk(logits.softmax(-1), 2)
        >>> mb.register_router(MyRouter, "generic", num_experts="out_features", top_k=lambda m: 2)
    """
    from .strategies import STRATEGIES
    if strategy not in STRATEGIES:
        raise ValueError(f"register_router: strategy={strategy!r}; choose one of {sorted(STRATEGIES)}")
    if score_func not in (None, "softmax", "sigmoid"):
        raise ValueError(f"register_router: score_func={score_func!r}; choose 'softmax' or 'sigmoid'")

    def getter(spec):
        if spec is None or callable(spec):
            return spec
        return lambda module: int(getattr(module, spec))
    _REGISTERED[router_cls] = RouterSpec(strategy, getter(num_experts), getter(top_k), score_func)


def supported_architectures() -> dict[str, str]:
    """``{model_type: strategy}`` for every architecture moe_balance patches and tests."""
    return dict(sorted(MODEL_TYPES.items()))


def unsupported_architectures() -> dict[str, str]:
    """``{model_type: reason}`` for MoE architectures that are recognised but not patched."""
    return dict(sorted(UNSUPPORTED.items()))


def discover_moe_model_types() -> list[str]:
    """Causal-LM model types of the installed transformers whose modeling file defines a router class.

    Reads the files as text (nothing is imported), so a new transformers release that adds an MoE
    architecture shows up here and in the tests until it is classified.
    """
    import importlib.util
    from pathlib import Path

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    # the names patch() looks at (ROUTER_NAME): "Gated" norms of dense hybrids (bamba) are not routers
    router_class = re.compile(r"^class \w*(Router|Gate|Gating)\(", re.M)
    # transformers 4.x: a plain linear gate inside a sparse block that takes the top-k itself
    block_class = re.compile(r"^class \w*(SparseMoeBlock|MoE|Moe)\(", re.M)
    found = []
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        spec = importlib.util.find_spec(f"transformers.models.{model_type}")
        if spec is None or spec.origin is None:
            continue
        path = Path(spec.origin).parent / f"modeling_{model_type}.py"
        if not path.exists():
            continue
        source = path.read_text()
        routes = router_class.search(source) or (block_class.search(source) and _TOPK_CALL.search(source))
        if routes and ("num_experts" in source or "n_routed_experts" in source):
            found.append(model_type)
    return sorted(found)


def _first_attr(obj: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


def router_shape(module: torch.nn.Module, config: Any) -> tuple[int | None, int | None]:
    """(num_experts, top_k) of a router, from its attributes, its weight or the model config."""
    spec = registered_spec(module)
    experts = spec.num_experts(module) if spec and spec.num_experts else None
    top_k = spec.top_k(module) if spec and spec.top_k else None
    experts = experts or native_bias_width(module)
    experts = experts or _first_attr(module, ("num_experts", "n_routed_experts", "num_local_experts"))
    top_k = top_k or _first_attr(module, ("top_k", "num_experts_per_tok", "moe_top_k", "top_k_experts"))
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        experts = experts or _first_attr(cfg, ("num_local_experts", "num_experts", "n_routed_experts"))
        top_k = top_k or _first_attr(cfg, ("num_experts_per_tok", "moe_top_k", "top_k", "top_k_experts"))
    weight = getattr(module, "weight", None)
    if experts is None and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        experts = weight.shape[0]
    gate = gate_linear(module)
    if experts is None and gate is not None:
        experts = gate.out_features
    return (int(experts) if experts else None, int(top_k) if top_k else None)


def native_bias_width(module: torch.nn.Module) -> int | None:
    """Slots a native-bias router ranks: its ``e_score_correction_bias`` is added to every one of them.

    This can exceed the expert count. LongCat-Flash ranks ``n_routed_experts + zero_expert_num``
    slots, the last ``zero_expert_num`` being zero-computation (identity) experts, while its
    ``num_experts`` says ``n_routed_experts``. Balance is then over all ``n + z`` slots: each zero
    expert is one slot, counted and biased like an FFN expert, as LongCat's own bias buffer covers
    them all. Equal load over the slots gives each token ``k * n / (n + z)`` FFN experts on average:
    8 of 12 with LongCat's defaults (n=512, z=256), the compute its zero experts are there to save.
    """
    bias = getattr(module, "e_score_correction_bias", None)
    if isinstance(bias, torch.Tensor) and bias.dim() == 1:
        return int(bias.numel())
    return None


def registered_spec(module: torch.nn.Module) -> RouterSpec | None:
    for cls in type(module).__mro__:
        if cls in _REGISTERED:
            return _REGISTERED[cls]
    for cls in type(module).__mro__:
        for (prefix, name), spec in _BUILTIN_BY_NAME.items():
            if cls.__name__ == name and cls.__module__.startswith(prefix):
                return spec
    return None


@functools.cache
def _source(obj: Any) -> str:
    """The source of a class or function, read once: every router of a 94-layer model shares one class."""
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


_TOPK_CALL = re.compile(r"\btopk\(")


def selects_itself(module: torch.nn.Module) -> bool:
    """Whether the module's own class (any of its methods) makes a top-k call. transformers 5.6's DeepSeek-V3
    family routers return logits only and their MoE block chooses (``route_tokens_to_experts``): the block is
    then what is patched."""
    return bool(_TOPK_CALL.search(_source(original_class(module))))


def gate_linear(module: torch.nn.Module, num_experts: int | None = None) -> torch.nn.Linear | None:
    """The plain ``nn.Linear`` router of a transformers 4.x sparse block (``self.gate`` / ``self.router``)."""
    for attr in GATE_CHILDREN:
        child = module._modules.get(attr)
        if isinstance(child, torch.nn.Linear) and not is_router_candidate(child) \
                and (num_experts is None or child.out_features == num_experts):
            return child
    return None


def router_owner(module: torch.nn.Module, num_experts: int) -> torch.nn.Module:
    """The module holding a patched site's router weight: the site itself, or, when the site is an MoE block
    that chooses for its router (4.x sparse blocks), that router child."""
    linear = gate_linear(module, num_experts)
    if linear is not None:
        return linear
    for attr in GATE_CHILDREN:
        child = module._modules.get(attr)
        if child is not None and is_router_candidate(child):
            return child
    return module


def is_gate_block(module: torch.nn.Module) -> bool:
    """A sparse MoE block whose router is a plain linear child and whose own forward takes the top-k
    (Mixtral, Qwen2/3-MoE, OLMoE, Jamba... in transformers 4.57): patched as a generic router."""
    return gate_linear(module) is not None and selects_itself(module)


def original_class(module: torch.nn.Module) -> type:
    """The router's own class, also when it is currently patched."""
    return getattr(type(module), "_mb_original_class", type(module))


def detect(module: torch.nn.Module, config: Any = None) -> tuple[str | None, str]:
    """(strategy or None, score_func) for a router module, by registration or by inspection."""
    spec = registered_spec(module)
    score_func = score_func_of(module, config)
    if spec is not None:
        return spec.strategy, score_func
    if isinstance(getattr(module, "e_score_correction_bias", None), torch.Tensor):
        return "native_bias", score_func
    if selects_itself(module):
        if getattr(module, "topk_method", None) == "group_limited_greedy":
            return "group_limited", score_func
        return "generic", score_func
    return None, score_func


def score_func_of(module: torch.nn.Module, config: Any = None) -> str:
    """How the router turns its logits into the scores it ranks and weights experts by.

    In order: a registration, a field on the router or its config naming it (cohere2_moe's
    ``expert_selection_fn`` can be either), the table of known architectures, and last a guess
    from the forward source (routers with a native bias are not all sigmoid: longcat_flash is softmax).
    """
    spec = registered_spec(module)
    if spec is not None and spec.score_func:
        return spec.score_func
    config = config if config is not None else getattr(module, "config", None)
    for holder in (module, config, getattr(config, "text_config", None)):
        named = _named_score_func(holder)
        if named:
            return named
    for model_type in (transformers_package(module), getattr(config, "model_type", None)):
        if model_type in SCORE_FUNCS:
            return SCORE_FUNCS[model_type]
    source = _source(original_class(module).forward)
    return "sigmoid" if "sigmoid" in source and "softmax" not in source else "softmax"


def _named_score_func(holder: Any) -> str | None:
    if holder is None:
        return None
    for name in SCORE_FUNC_FIELDS:
        value = getattr(holder, name, None)
        if isinstance(value, str) and value.lower() in ("softmax", "sigmoid"):
            return value.lower()
    return None


def transformers_package(module: torch.nn.Module) -> str | None:
    """``transformers.models.<package>`` of the router's own class (usually its model_type)."""
    for cls in original_class(module).__mro__:
        parts = cls.__module__.split(".")
        if len(parts) > 2 and parts[:2] == ["transformers", "models"]:
            return parts[2]
    return None


def is_router_candidate(module: torch.nn.Module) -> bool:
    return registered_spec(module) is not None or bool(ROUTER_NAME.search(type(module).__name__))
