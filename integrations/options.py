"""The ``moe_balance`` options a framework's own config carries (axolotl YAML, LlamaFactory YAML, ms-swift's
``MOE_BALANCE``): ``BalanceConfig`` fields and the HF callback's options, checked before training starts.

Example:
    >>> kwargs = callback_kwargs({"bias_update": "sign", "heatmap_every": 0, "ship": True})
    >>> kwargs["heatmap_every"], kwargs["bias_update"], kwargs["ship"]
    (0, 'sign', True)
"""

from __future__ import annotations

from typing import Any
from collections.abc import Mapping

from moe_balance.config import BalanceConfig

# MoEBalanceCallback's own keyword arguments -> the check each value must pass, and what it must be
CALLBACK_KEYS: dict[str, tuple[Any, str]] = {
    "write_stats": (lambda v: isinstance(v, bool), "true or false"),
    "repair_resume": (lambda v: isinstance(v, bool), "true or false"),
    "keep_model_aux_loss": (lambda v: isinstance(v, bool), "true or false"),
    "ship": (lambda v: isinstance(v, bool), "true or false"),
    "heatmap_every": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "ship_batches": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
}


def callback_kwargs(section: Mapping[str, Any] | Any) -> dict[str, Any]:
    """Check a ``moe_balance`` section and turn it into ``MoEBalanceCallback`` keyword arguments.

    ``BalanceConfig`` fields are validated by :meth:`BalanceConfig.from_dict` (unknown keys raise with a
    suggestion); the keys of :data:`CALLBACK_KEYS` are the callback's own options.
    """
    if isinstance(section, Mapping) or section is None:  # axolotl's DictDefault answers None to any attribute
        data = dict(section or {})
    else:  # a pydantic model (axolotl's validated section)
        data = section.model_dump(exclude_none=True)
    data = {k: v for k, v in data.items() if v is not None}
    own = {k: data.pop(k) for k in CALLBACK_KEYS if k in data}
    for key, value in own.items():
        check, allowed = CALLBACK_KEYS[key]
        if not check(value):
            raise ValueError(f"moe_balance.{key} must be {allowed}, got {value!r}")
    config = BalanceConfig.from_dict(data)
    return {**{k: v for k, v in config.to_dict().items() if k in data}, **own}


__all__ = ["callback_kwargs", "CALLBACK_KEYS"]
