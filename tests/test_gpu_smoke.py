"""examples/gpu_smoke.py runs its CPU dry run (bf16, no fp16, no device_map) and every row passes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from .conftest import ROOT

pytest.importorskip("transformers")


@pytest.mark.slow
def test_gpu_smoke_cpu_dry_run(tmp_path):
    # one generic-router model: the native-bias path of every check runs in the CPU tests already
    cmd = [sys.executable, str(ROOT / "examples" / "gpu_smoke.py"), "--cpu", "--steps", "8", "--models", "mixtral",
           "--output-dir", str(tmp_path / "smoke")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"gpu_smoke.py --cpu timed out after 600 s:\n{out[-3000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-4000:]}\n{err[-4000:]}"
    rows = re.findall(r"^(\S.*?)\s+\| (\S+)\s+\| (\S+)\s+\| (PASS|FAIL|SKIP)\s+\|", out, flags=re.M)
    results = {(check.strip(), model, precision): status for check, model, precision, status in rows}
    for check, precision in (("train", "bf16"), ("bias moves", "bf16"), ("ships as trained", "bf16"),
                             ("aux -> router", "fp32"), ("aux -> router", "bf16"), ("resume", "bf16")):
        assert results.get((check, "mixtral", precision)) == "PASS", (check, precision, out[-4000:])
    assert results.get(("device_map auto", "mixtral", "-")) == "SKIP"  # no device_map in the dry run
    assert "FAIL" not in results.values()
    assert re.search(r"^6 passed, 0 failed, 2 skipped$", out, flags=re.M), out[-2000:]
