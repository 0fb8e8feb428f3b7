"""Optional dependencies, imported only where they are used, with an install hint."""

from __future__ import annotations

import importlib
from types import ModuleType

_EXTRAS = {"transformers": "hf", "deepspeed": "deepspeed", "accelerate": "accelerate",
           "matplotlib": "plot", "numpy": "plot"}


def require(module: str) -> ModuleType:
    """Import ``module`` or raise ImportError telling which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = _EXTRAS.get(top, "all")
        raise ImportError(f"moe_balance needs {top!r} for this feature: pip install 'moe-balance[{extra}]' "
                          f"(or pip install {top})") from exc
