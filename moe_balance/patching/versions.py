"""Which transformers releases each architecture is verified on, and what happens on the others.

The compatibility stage of CI (``.ci/compat``) installs each release of :data:`TESTED` in its own environment and
runs the architecture tests there: every model type of :data:`~.registry.MODEL_TYPES` that the release defines is
built tiny, patched, and must match its unpatched twin bit for bit. :data:`VERIFIED` records the outcome per
release; ``tests/test_versions.py`` fails in an environment whose list is out of date, and
``python -m moe_balance.patching.versions`` prints the line to paste.

On any other release (a newer one, or one between), or for a model type not verified on the installed one,
:func:`~moe_balance.patch` warns and compares each router's patched forward at a zero bias with its stock forward
on the model's first forward; a difference unpatches the model and raises :class:`UnverifiedRouterError`.
"""

from __future__ import annotations

import sys

# release series (major.minor) the compatibility stage runs: the last 4.x, LlamaFactory's newest, ms-swift's
# newest, and the newest release when the list was last updated
TESTED = ("4.57", "5.6", "5.19", "5.25")

# (model_type, series) -> why a release that defines the model type is not verified for it
BROKEN: dict[tuple[str, str], str] = {
    ("deepseek_v2", "5.6"): "transformers 5.6's DeepseekV2Moe.route_tokens_to_experts reads self.num_experts, "
                            "which it never sets, when topk_method='group_limited_greedy' (the model fails unpatched)",
}

# series -> model types verified there (generated: python -m moe_balance.patching.versions, in that environment)
VERIFIED: dict[str, tuple[str, ...]] = {
    "4.57": (
        "deepseek_v2", "deepseek_v3", "dots1", "ernie4_5_moe", "flex_olmo", "glm4_moe", "gpt_oss", "granitemoe",
        "granitemoehybrid", "granitemoeshared", "hunyuan_v1_moe", "jamba", "jetmoe", "llama4", "llama4_text",
        "longcat_flash", "minimax", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "qwen3_next",
    ),
    "5.6": (
        "afmoe", "deepseek_v3", "dots1", "ernie4_5_moe", "exaone_moe", "flex_olmo", "gemma4", "gemma4_text",
        "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "gpt_oss", "granitemoe", "granitemoehybrid", "granitemoeshared",
        "hunyuan_v1_moe", "hy_v3", "jamba", "jetmoe", "lfm2_moe", "llama4", "llama4_text", "longcat_flash", "minimax",
        "minimax_m2", "mixtral", "nemotron_h", "olmoe", "qwen2_moe", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_moe",
        "qwen3_next", "solar_open",
    ),
    "5.19": (
        "afmoe", "axk1", "axk2", "cohere2_moe", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "ernie4_5_moe",
        "exaone_moe", "flex_olmo", "gemma4", "gemma4_text", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "gpt_oss",
        "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "hy_v4",
        "jamba", "jetmoe", "kimi_linear", "laguna", "lfm2_moe", "llama4", "llama4_text", "longcat_flash", "mellum",
        "mimo_v2_flash", "minimax", "minimax_m2", "mixtral", "nemotron_h", "olmoe", "qwen2_moe", "qwen3_5_moe",
        "qwen3_5_moe_text", "qwen3_moe", "qwen3_next", "qwen4_exp", "qwen4_exp_text", "solar_open",
    ),
    "5.25": (
        "afmoe", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe", "deepseek_v2", "deepseek_v3",
        "deepseek_v32", "dots1", "dots3_note_text", "ergo", "ernie4_5_moe", "exaone_moe", "flex_olmo", "flint",
        "gemma4", "gemma4_text", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "gpt_oss", "granitemoe",
        "granitemoe_swa", "granitemoehybrid", "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "hy_v4", "jamba",
        "jetmoe", "kimi_linear", "kolibri1", "kolibri1_1", "laguna", "lara_mini", "lfm2_moe", "llama4", "llama4_text",
        "longcat_flash", "mellum", "mimo_v2_flash", "minicpm5_moe", "minimax", "minimax_m2", "mixtral", "nemotron_h",
        "olmoe", "qwen2_moe", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_moe", "qwen3_next", "qwen4_exp",
        "qwen4_exp_text", "solar_open",
    ),
}


class UnverifiedRouterError(RuntimeError):
    """A router on a transformers release it was not verified on routes differently when patched."""


def series(version: str) -> str:
    """``"5.25"`` for ``"5.25.0"`` or ``"5.25.0.dev0"``."""
    major, minor = version.split(".")[:2]
    return f"{int(major)}.{int(''.join(c for c in minor if c.isdigit()) or 0)}"


def installed_series() -> str | None:
    """The installed transformers release series, or None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    return series(transformers.__version__)


def verified_on(model_type: str) -> list[str]:
    """The tested release series on which ``model_type`` is verified."""
    return [s for s in TESTED if model_type in VERIFIED.get(s, ())]


def is_verified(model_type: str | None, release: str | None = None) -> bool:
    """Whether ``model_type`` is verified on ``release`` (default: the installed transformers)."""
    release = release or installed_series()
    return model_type is not None and model_type in VERIFIED.get(release or "", ())


def verifiable_here() -> list[str]:
    """The model types of the registry that the installed transformers defines, minus those broken upstream on it:
    what the architecture tests parametrize over, and what :data:`VERIFIED` must list for this release."""
    from transformers import CONFIG_MAPPING

    from .registry import MODEL_TYPES
    release = installed_series()
    return sorted(t for t in MODEL_TYPES if t in CONFIG_MAPPING and (t, release) not in BROKEN)


def main() -> None:
    release = installed_series()
    types = verifiable_here()
    print(f"    {release!r}: (" + ", ".join(repr(t) for t in types) + ",),")
    if release not in TESTED:
        print(f"# {release} is not in TESTED {TESTED}", file=sys.stderr)


if __name__ == "__main__":
    main()
