"""LlamaFactory integration: run the same training command through this module.

.. code-block:: bash

    llamafactory-cli train qwen3_moe_full.yaml                          # before
    python -m moe_balance.integrations.llamafactory train qwen3_moe_full.yaml  # after: balanced

LlamaFactory has no config key for extra Trainer callbacks; its public seam is
``llamafactory.train.tuner.run_exp(args, callbacks)``, which hands them to ``Trainer(callbacks=...)``, so the
HF :class:`~moe_balance.integrations.hf.MoEBalanceCallback` patches the routers inside ``Trainer.__init__``.
This module reads the YAML (or JSON) and its ``key=value`` overrides with LlamaFactory's own ``read_args``,
takes out an optional ``moe_balance:`` section (LlamaFactory's argument parser refuses unknown keys),
validates it like the axolotl plugin does and calls ``run_exp``:

.. code-block:: yaml

    moe_balance:               # optional; BalanceConfig fields plus the callback's options
      aux_loss: global_batch
      heatmap_every: 0

LlamaFactory's own router aux loss (``moe_aux_loss_coef``, which turns ``output_router_logits`` on) is switched
off by the callback for the whole run, with a warning; ``keep_model_aux_loss: true`` in the section keeps it.
The process trains in place: for several GPUs run it under ``torchrun --nproc_per_node N -m ...``
(``llamafactory-cli`` would start torchrun on its own launcher, without the callback).

LlamaFactory itself is optional: this module imports without it.

Example:
    >>> args, kwargs = split_args({"stage": "pt", "moe_balance": {"bias_update": "sign", "heatmap_every": 0}})
    >>> "moe_balance" in args, kwargs["bias_update"], kwargs["heatmap_every"]
    (False, 'sign', 0)
"""

from __future__ import annotations

import sys
from typing import Any

from .options import callback_kwargs

SECTION = "moe_balance"


def split_args(args: dict[str, Any] | list[str]) -> tuple[dict[str, Any] | list[str], dict[str, Any]]:
    """LlamaFactory's arguments without the ``moe_balance`` section, and the callback's keyword arguments."""
    if not isinstance(args, dict):  # plain ``--key value`` arguments: no section, the defaults
        return args, {}
    args = dict(args)
    section = dict(args.pop(SECTION, None) or {})
    return args, callback_kwargs(section)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["train"]:
        raise SystemExit("usage: python -m moe_balance.integrations.llamafactory train CONFIG.yaml [key=value ...]")
    try:
        from llamafactory.hparams import read_args
        from llamafactory.train.tuner import run_exp
    except ImportError as err:
        raise SystemExit(f"moe_balance.integrations.llamafactory needs LlamaFactory (pip install llamafactory): "
                         f"{err}") from err
    from .hf import MoEBalanceCallback
    saved, sys.argv = sys.argv, [sys.argv[0], *argv[1:]]  # read_args reads sys.argv, as llamafactory-cli leaves it
    try:
        args, kwargs = split_args(read_args())
    finally:
        sys.argv = saved
    run_exp(args=args, callbacks=[MoEBalanceCallback(**kwargs)])


if __name__ == "__main__":
    main()
