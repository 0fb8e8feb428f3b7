"""A small JSONL stats file per run (metrics, loads and bias per logged step) and log-key naming."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from collections.abc import Iterator

PREFIX = "moe_balance/"


def prefixed(metrics: dict[str, float], prefix: str = PREFIX) -> dict[str, float]:
    return {prefix + key: value for key, value in metrics.items()}


class StatsWriter:
    """Appends one JSON line per call: ``{"step", "metrics", "loads_LE", "bias_LE"}``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, metrics: dict[str, float], balancer: Any) -> None:
        record = {"step": int(step), "metrics": metrics,
                  "loads_LE": balancer.load_matrix().tolist(),
                  "bias_LE": balancer.bias_LE.tolist()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_stats(path: str | Path) -> Iterator[dict[str, Any]]:
    with Path(path).open() as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
