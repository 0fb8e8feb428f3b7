"""Scripts the multi-process tests run under ``torchrun`` (each asserts its world size).

A worker's ``main(argv)`` takes its arguments as a list whose first item is its output folder. Run as
``script.py --each SCENARIOS.json`` it runs ``main`` once per argument list of that JSON file, in order, in the
same processes: several scenarios pay the interpreter, torch and transformers start-up (about 15 s of CPU per
process) once. A scenario that raises writes its traceback to ``<its folder>/error<rank>.txt`` and the next one
runs; the test of that scenario fails with it (``tests.conftest.scenario_result``).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path


def reset_between_scenarios() -> None:
    """Forget the process-wide state a finished scenario leaves: Accelerate's singletons (the Trainer and
    Accelerator read them) and transformers' global DeepSpeed config (``zero.Init`` in from_pretrained)."""
    import gc
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=True)
    if "transformers.integrations.deepspeed" in sys.modules:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
        unset_hf_deepspeed_config()
    gc.collect()


def run_then_exit(main: Callable[[list[str]], None]) -> None:
    """Run ``main`` on the command line's arguments (or once per scenario with ``--each FILE``), then leave
    without interpreter teardown.

    Gloo worker threads still referenced by process-group objects (DeviceMesh, FSDP, DeepSpeed groups) can
    abort the interpreter's finalization with SIGABRT ("terminate called without an active exception"; see
    pytorch/pytorch#179291) after every result is written: seen once in CI on the FSDP2 worker. An exception
    in ``main`` still propagates and fails the run.
    """
    argv = sys.argv[1:]
    if argv[:1] == ["--each"]:
        rank = os.environ.get("RANK", "0")
        for scenario in json.loads(Path(argv[1]).read_text()):
            Path(scenario[0]).mkdir(parents=True, exist_ok=True)  # as a test's tmp_path: there on every rank
            try:
                main(scenario)
            except Exception:  # recorded for that scenario's test; the others still run
                (Path(scenario[0]) / f"error{rank}.txt").write_text(traceback.format_exc())
            reset_between_scenarios()
    else:
        main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
