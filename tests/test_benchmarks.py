"""Smoke tests: the benchmark scripts run at toy size and write outputs that parse (not their speed)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow


def run(*args: str, cwd) -> str:
    # as a user runs them: the installed package, no PYTHONPATH (a script that imports `benchmarks` must say so)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_quality_quick_smoke(tmp_path):
    out = run(str(ROOT / "benchmarks" / "quality.py"), "--quick", "--steps", "6", "--seeds", "2",
              "--methods", "none,global_batch_1e-2", "--eval-batches", "2",
              "--frozen-methods", "quantile", "--frozen-steps", "3", "--floor-batches", "2", "--out", str(tmp_path),
              cwd=tmp_path)  # 2 floor batches (x 30 bias iterations): the price-floor path at a tenth of the cost
    assert "file-list hash" in out
    assert "sampling floor" in out
    rows = list(csv.DictReader((tmp_path / "quality_quick.csv").open()))
    learning = [r for r in rows if r["frozen"] == "False"]
    assert len(learning) == 4 and {r["method"] for r in learning} == {"none", "global_batch_1e-2"}
    assert [r["method"] for r in rows if r["frozen"] == "True"] == ["quantile", "quantile"]
    for r in learning:
        assert float(r["val_loss"]) > 0 and float(r["maxvio_global"]) >= 0 and float(r["step_ms"]) > 0
    for r in rows:  # price floors are measured for quantile rows only
        has_floor = r["method"] == "quantile"
        assert all((r[k] not in ("", "nan")) == has_floor for k in ("floor_pool", "floor_batch", "floor_heldout"))
    table = (tmp_path / "quality_quick.md").read_text()
    # header + 2 methods, the frozen table's header + 1 method, the floor table's header + 1 row
    assert table.count("\n| ") == 3 + 2 + 2
    assert "quantile (frozen router)" in table
    assert "steps to balance" in table
    assert (tmp_path / "quality_quick_maxvio.png").exists()


def test_price_noise_smoke(tmp_path):
    out = run(str(ROOT / "benchmarks" / "price_noise.py"), "--steps", "4", "--seeds", "1", "--pool", "2",
              "--singles", "2", "--eval-batches", "2", "--out", str(tmp_path), cwd=tmp_path)
    assert "| one_batch |" in out
    row = json.loads((tmp_path / "price_noise_quantile_1024.json").read_text())["rows"][0]
    assert row["noise_var_measured"] > 0 and 0 < row["share"] <= 1  # two one-batch prices differ
    assert all(row[k] >= 0 for k in ("trained", "pool", "one_batch"))


def test_finetune_smoke(tmp_path):
    out = run(str(ROOT / "benchmarks" / "finetune.py"), "--seeds", "1", "--steps", "10", "--pretrain-steps", "2",
              "--methods", "none,quantile_no_fold,default", "--eval-batches", "2", "--fold-batches", "2",
              "--floor-iters", "5", "--out", str(tmp_path), "--cache", str(tmp_path / "cache"), cwd=tmp_path)
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "finetune.csv").open())}
    assert set(rows) == {"none", "quantile_no_fold", "default"}
    # the default's weights carry the routing: the stock load routes as trained
    # (the last 10 steps include the first, before the fold's direction fits)
    differ = {name: float(rows[name]["routing_differ_last10"]) for name in ("default", "quantile_no_fold")}
    assert float(rows["default"]["agreement_min"]) == 1.0 and differ["default"] < differ["quantile_no_fold"] / 3, differ
    assert "worst ratio to bias-only" in out and "Paired by seed" in out
    # each split's price floor: only where a price exists, and below what a 10-step bias reaches
    assert rows["none"]["floor_like"] == "nan" or math.isnan(float(rows["none"]["floor_like"]))
    reference = rows["quantile_no_fold"]
    assert float(reference["floor_like"]) < float(reference["maxvio_like_patched"]), reference
    assert float(reference["floor_heldout"]) < float(reference["maxvio_patched"]), reference
    assert (tmp_path / "finetune.png").exists() and json.loads((tmp_path / "finetune_curves.json").read_text())


def test_fold_scale_smoke(tmp_path):
    out = run(str(ROOT / "benchmarks" / "fold_scale.py"), "--shapes", "toy", "--seeds", "1", "--repeats", "2",
              cwd=tmp_path)
    row = next(line for line in out.splitlines() if line.startswith("| toy"))
    # toy (4 layers, d 64): v, p, a (fp64 L x d) + fit; the window adds 3 d + 2 sums per layer
    assert "0.0 MiB" in row and "step()" not in row


def test_overhead_toy_smoke(tmp_path):
    out = run(str(ROOT / "benchmarks" / "overhead.py"), "--toy", "--steps", "2", "--warmup", "1",
              "--archs", "mixtral", "--memory-variants", "unpatched,quantile", "--json", str(tmp_path / "o.json"),
              cwd=tmp_path)  # one fresh process per measured variant: two are enough to check the path
    assert "all-reduce calls per step: 1" in out
    data = json.loads((tmp_path / "o.json").read_text())
    assert set(data["mixtral"]["step_ms"]) == {"unpatched", "bias", "quantile", "bias+aux+z", "hf_aux"}
    assert data["step_60x256"]["calls"] == data["step_60x256"]["steps"] == 5
    memory = data["mixtral"]["saved_memory_mb"]
    assert memory["unpatched"] > 0 and memory["quantile"] > 0


def test_core_overhead_smoke(tmp_path):
    out = run(str(ROOT / "benchmarks" / "core_overhead.py"), "--tokens", "256", "--experts", "16", "--top-k", "2",
              "--layers", "4", "--repeats", "2", cwd=tmp_path)
    assert "overhead observe" in out and "step() for 4 layers" in out
