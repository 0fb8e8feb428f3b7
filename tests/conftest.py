"""Shared test helpers: multi-process runs through real torchrun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Tiny models gain nothing from a second intra-op thread, and on a 2-core machine a spinning OpenMP pool in
# this process slows the torchrun workers it waits for (a 4-step TRL run: 19 s with two threads on a busy
# machine, 0.7 s with one). Workers get OMP_NUM_THREADS=1 (run_torchrun); this process gets one thread too.
torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = 600,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` under ``torchrun --nproc_per_node nproc`` in its own process group."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=full_env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun {script.name} timed out after {timeout}s:\n{out[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun {script.name} failed ({proc.returncode}):\n{out[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def run_scenarios(script: Path, root: Path, scenarios: dict[str, list[str]], nproc: int = 2, timeout: float = 900,
                  env: dict[str, str] | None = None) -> None:
    """One torchrun running each scenario in turn in the same processes (``tests.workers.run_then_exit``):
    scenario ``name`` gets ``root/name`` as its first argument (its output folder), then its own arguments."""
    listing = [[str(root / name), *args] for name, args in scenarios.items()]
    (root / "scenarios.json").write_text(json.dumps(listing))
    run_torchrun(script, "--each", str(root / "scenarios.json"), nproc=nproc, timeout=timeout, env=env)


def run_single_process(main, *args) -> None:
    """The one-process reference of a two-rank test, run in this process with a worker's ``main``: it saves the
    interpreter, torch and framework start-up of a subprocess. Process-wide state (Accelerate's singletons,
    transformers' DeepSpeed config) is reset before and after, as between the scenarios of one launch."""
    from .workers import reset_between_scenarios
    reset_between_scenarios()
    try:
        main(*args)
    finally:
        reset_between_scenarios()


def fail_if_scenario_raised(folder: Path) -> None:
    errors = sorted(folder.glob("error*.txt"))
    if errors:
        pytest.fail(f"scenario {folder.name} raised:\n" + "\n".join(e.read_text()[-4000:] for e in errors))


def scenario_result(folder: Path, nproc: int, name: str = "rank{rank}.json") -> list[dict]:
    """What each rank of one scenario of ``run_scenarios`` wrote, or the failure with its traceback."""
    fail_if_scenario_raised(folder)
    return [json.loads((folder / name.format(rank=r)).read_text()) for r in range(nproc)]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with slow tests first (a stable sort): under ``--dist loadfile`` the last files to start make the
    tail where one worker waits for the other, and short files fill it best."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
