"""Scripts the multi-process tests run under ``torchrun`` (each asserts its world size)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def run_then_exit(main: Callable[[], None]) -> None:
    """Run ``main``, then leave without interpreter teardown.

    Gloo worker threads still referenced by process-group objects (DeviceMesh, FSDP, DeepSpeed groups) can
    abort the interpreter's finalization with SIGABRT ("terminate called without an active exception"; see
    pytorch/pytorch#179291) after every result is written: seen once in CI on the FSDP2 worker. An exception
    in ``main`` still propagates and fails the run.
    """
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
