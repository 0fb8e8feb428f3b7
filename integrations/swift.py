"""ms-swift integration: one line added to the ``swift sft`` / ``swift pt`` command you already run.

.. code-block:: bash

    swift sft --model Qwen/Qwen3-30B-A3B --tuner_type full ... \\
        --external_plugins "$(python -m moe_balance.integrations.swift --path)" --callbacks moe_balance

    # optional: BalanceConfig fields and the callback's options, as a JSON object
    MOE_BALANCE='{"aux_loss": "global_batch", "aux_loss_coef": 1e-3, "heatmap_every": 0}' swift sft ...

Both flags are ms-swift's public seams (4.x): ``--external_plugins FILE.py`` imports a file by path while the
arguments are parsed, and ``--callbacks NAME`` builds ``swift.callbacks.callbacks_map[NAME](args, trainer)``
and passes it to ``Trainer(callbacks=...)``, so :class:`~moe_balance.integrations.hf.MoEBalanceCallback` patches
the routers in its ``on_init_end``, inside ``Trainer.__init__``, as with a plain HF Trainer (metrics in swift's
console, ``logging.jsonl`` and ``trainer_state.json``; balancer state in every checkpoint). ``--path`` prints a
two-line plugin file calling :func:`register`, written once into a folder of its own (``~/.cache/moe_balance/
swift_plugin``, or ``--folder``): swift puts the folder of every plugin file first on ``sys.path``, so this
module itself must not be the plugin (its folder holds ``deepspeed.py``, ``accelerate.py``, ... which would shadow
those packages). Passing plugins or callbacks already? Add to the same flags (``--external_plugins mine.py
"$(...)" --callbacks early_stop moe_balance``): a repeated flag replaces the earlier one. With a swift YAML
config, put the line after it: ``swift sft config.yaml --external_plugins ... --callbacks moe_balance``.

``MOE_BALANCE``: a JSON object (a mapping in the YAML's ``ENV:`` section works too), checked by
:func:`moe_balance.integrations.options.callback_kwargs` (unknown keys fail with a suggestion) when the plugin
is imported, before the model loads; ``keep_model_aux_loss``, ``ship`` and ``ship_batches`` go to the callback.

swift's own MoE aux loss: before every forward swift writes ``--router_aux_loss_coef`` (default 0) into the model
config and adds ``output_router_logits=True`` to the batch only when it is > 0. The callback switches the config's
``output_router_logits`` off (warning once; the saved config then says ``false``) and refuses a non-zero
``--router_aux_loss_coef`` at ``Trainer(...)``, since both would train the routers, unless
``MOE_BALANCE='{"keep_model_aux_loss": true}'``. Tested with ms-swift 4.6 (``swift pt``, full fine-tuning, CPU);
``swift rlhf`` trainers take ``--callbacks`` the same way but are untested; Megatron-SWIFT (``megatron sft``) has
its own callback table and MoE layers and is not covered.

ms-swift is optional: this module imports without it (:func:`register` then raises ImportError).

Example:
    >>> options({"MOE_BALANCE": '{"bias_update": "sign", "heatmap_every": 0}'})
    {'bias_update': 'sign', 'heatmap_every': 0}
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from .options import callback_kwargs

NAME = "moe_balance"  # the --callbacks name
ENV = "MOE_BALANCE"  # JSON options
PLUGIN_SOURCE = ('"""ms-swift --external_plugins file: registers --callbacks moe_balance (written by '
                 'python -m moe_balance.integrations.swift --path)."""\n'
                 "from moe_balance.integrations.swift import register\n\nregister()\n")


def options(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``MoEBalanceCallback`` keyword arguments from ``$MOE_BALANCE`` (empty: the defaults), validated."""
    raw = (os.environ if environ is None else environ).get(ENV, "").strip()
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        try:  # swift's YAML ENV: section turns a mapping into str(dict)
            data = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            data = None
    if not isinstance(data, dict):
        raise ValueError(f"{ENV} must be a JSON object such as '{{\"aux_loss\": \"global_batch\"}}', got {raw!r}")
    return callback_kwargs(data)


def make_callback(args: Any = None, trainer: Any = None) -> Any:
    """What ``--callbacks moe_balance`` builds: swift calls ``callbacks_map[name](args, trainer)``."""
    from .hf import MoEBalanceCallback
    return MoEBalanceCallback(**options())


def register(callbacks_map: dict[str, Any] | None = None) -> None:
    """Add ``moe_balance`` to swift's callback table (``swift.callbacks.callbacks_map``) and check
    ``$MOE_BALANCE`` now, so a bad option fails while swift parses its arguments."""
    if callbacks_map is None:
        try:
            from swift.callbacks import callbacks_map
        except ImportError as exc:
            raise ImportError("moe_balance.integrations.swift.register() needs ms-swift >= 4 "
                              "(swift.callbacks.callbacks_map): pip install ms-swift") from exc
    make_callback()  # validates the options (and that transformers is importable); the instance is dropped
    callbacks_map[NAME] = make_callback


def plugin_path(folder: str | os.PathLike | None = None) -> Path:
    """The ``--external_plugins`` file (written if missing or stale) in a folder holding nothing else."""
    if folder is None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = Path(cache) / "moe_balance" / "swift_plugin"
    path = Path(folder) / "moe_balance_swift_plugin.py"
    if not path.exists() or path.read_text() != PLUGIN_SOURCE:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{path.name}.{os.getpid()}.tmp"
        tmp.write_text(PLUGIN_SOURCE)
        os.replace(tmp, path)  # atomic: concurrent ranks or nodes never read half a file
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m moe_balance.integrations.swift",
                                     description="Print the ms-swift --external_plugins file of moe_balance.")
    parser.add_argument("--path", action="store_true", help="print the file to pass to swift's --external_plugins")
    parser.add_argument("--folder", help="write the plugin file here (default ~/.cache/moe_balance/swift_plugin)")
    args = parser.parse_args(argv)
    if not args.path:
        parser.print_help()
        return 2
    options()  # a bad MOE_BALANCE fails here, before swift starts
    print(plugin_path(args.folder))
    return 0


__all__ = ["register", "make_callback", "options", "plugin_path", "NAME", "ENV"]

if __name__ == "__main__":
    raise SystemExit(main())
