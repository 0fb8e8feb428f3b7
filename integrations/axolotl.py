"""Axolotl integration: a plugin that reads a ``moe_balance:`` section of the axolotl YAML.

.. code-block:: yaml

    plugins:
      - moe_balance.integrations.axolotl.MoEBalancePlugin
    moe_balance:
      bias_update: sign
      bias_update_rate: 1.0e-3
      aux_loss: global_batch
      heatmap_every: 10        # callback options: heatmap_every, write_stats, repair_resume

The section is validated with axolotl's config (``get_input_args`` adds :class:`MoEBalanceArgs` to its
pydantic model): an unknown key or a bad value fails at ``axolotl train`` / ``validate_config``, with the
"did you mean" of :class:`~moe_balance.BalanceConfig`. The plugin hands axolotl the HF
:class:`~moe_balance.integrations.hf.MoEBalanceCallback` through ``add_callbacks_pre_trainer``: those callbacks
are given to ``Trainer(callbacks=...)``, so the callback's ``on_init_end`` patches the routers inside
``Trainer.__init__`` (callbacks from ``add_callbacks_post_trainer`` are added after it and would miss it).

axolotl itself is optional (it needs Python >= 3.12): this module imports without it.

Example:
    >>> kwargs = callback_kwargs({"bias_update": "sign", "heatmap_every": 0})
    >>> kwargs["heatmap_every"], kwargs["bias_update"]
    (0, 'sign')
"""

from __future__ import annotations

from typing import Any

from .options import CALLBACK_KEYS, callback_kwargs

try:
    from axolotl.integrations.base import BasePlugin
except ImportError:  # axolotl not installed: the plugin class still exists, axolotl never loads it
    BasePlugin = object  # type: ignore[misc, assignment]

try:
    from pydantic import BaseModel, ConfigDict, model_validator
except ImportError:  # pragma: no cover - pydantic comes with axolotl
    BaseModel = None  # type: ignore[misc, assignment]

if BaseModel is not None:
    class MoEBalanceSection(BaseModel):
        """The ``moe_balance:`` block: ``BalanceConfig`` fields plus the callback's options."""

        model_config = ConfigDict(extra="allow")

        @model_validator(mode="after")
        def _check(self) -> MoEBalanceSection:
            callback_kwargs(self)
            return self

    class MoEBalanceArgs(BaseModel):
        """What the plugin adds to axolotl's config model."""

        moe_balance: MoEBalanceSection | None = None


class MoEBalancePlugin(BasePlugin):
    """Axolotl plugin: ``plugins: [moe_balance.integrations.axolotl.MoEBalancePlugin]`` plus a ``moe_balance:``
    section (see the module docstring). Without the section the plugin does nothing."""

    def get_input_args(self) -> str:
        return "moe_balance.integrations.axolotl.MoEBalanceArgs"

    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list[Any]:
        section = cfg.get("moe_balance") if hasattr(cfg, "get") else getattr(cfg, "moe_balance", None)
        if not section:
            return []
        from .hf import MoEBalanceCallback
        return [MoEBalanceCallback(**callback_kwargs(section))]


__all__ = ["MoEBalancePlugin", "callback_kwargs", "CALLBACK_KEYS"]
