"""Pictures of balance (matplotlib, optional extra ``moe-balance[plot]``).

* :func:`plot_maxvio` - MaxVio against step, one line per method or run;
* :func:`plot_load_heatmap` - layer x expert load share, before and after balancing;
* :func:`plot_bias` - bias trajectories of one layer's experts;
* :func:`plot_run` - all three from a run's ``moe_balance_stats.jsonl``
  (``python -m moe_balance plot RUN_DIR -o balance.png``).
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Mapping, Sequence

from ._optional import require
from .stats_log import read_stats

STATS_FILE = "moe_balance_stats.jsonl"


def _pyplot():
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _shares(loads_LE: Sequence[Sequence[float]]) -> list[list[float]]:
    """Load as a multiple of the fair share (1.0 = perfectly balanced)."""
    out = []
    for row in loads_LE:
        mean = sum(row) / len(row) or 1.0
        out.append([value / mean for value in row])
    return out


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (window 1 = raw)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def draw_maxvio(ax, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], smooth: int = 1) -> None:
    import matplotlib
    colors = matplotlib.colormaps["tab20"].colors
    for i, (label, (steps, values)) in enumerate(series.items()):
        ax.plot(steps, _smooth(list(values), smooth), label=label, color=colors[(2 * i) % 20 + (2 * i) // 20 % 2])
    ax.set_xlabel("step")
    ax.set_ylabel("MaxVio (max load / mean - 1)")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def draw_heatmap(fig, ax, loads_LE: Sequence[Sequence[float]], title: str, vmax: float) -> None:
    image = ax.imshow(_shares(loads_LE), aspect="auto", cmap="magma", vmin=0.0, vmax=vmax)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(loads_LE)))
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="load / fair share")


def draw_bias(ax, steps: Sequence[float], bias_TE: Sequence[Sequence[float]], layer: int = 0) -> None:
    for expert in range(len(bias_TE[0]) if bias_TE else 0):
        ax.plot(steps, [row[expert] for row in bias_TE], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel(f"bias (layer {layer}, one line per expert)")
    ax.grid(alpha=0.3)


def plot_maxvio(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path,
                smooth: int = 1, title: str | None = None) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    draw_maxvio(ax, series, smooth)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_load_heatmap(before_LE: Sequence[Sequence[float]], after_LE: Sequence[Sequence[float]],
                      path: str | Path, titles: tuple[str, str] = ("before", "after")) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    vmax = max(max(max(r) for r in _shares(m)) for m in (before_LE, after_LE))
    for ax, loads, title in zip(axes, (before_LE, after_LE), titles):
        draw_heatmap(fig, ax, loads, title, vmax)
    return _save(fig, path)


def plot_bias(steps: Sequence[float], bias_TE: Sequence[Sequence[float]], path: str | Path, layer: int = 0) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    draw_bias(ax, steps, bias_TE, layer)
    return _save(fig, path)


def plot_run(run_dir: str | Path, output: str | Path = "balance.png") -> Path:
    """MaxVio, first/last load heatmaps and layer-0 bias of one run's stats file."""
    run_dir = Path(run_dir)
    path = run_dir if run_dir.is_file() else run_dir / STATS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: train with the integration's write_stats=True first")
    records = list(read_stats(path))
    if not records:
        raise ValueError(f"{path} holds no records")
    plt = _pyplot()
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    draw_maxvio(axes[0][0], {
        "MaxVio (step window)": (steps, [r["metrics"]["maxvio_global"] for r in records]),
        "MaxVio (micro-batch)": (steps, [r["metrics"]["maxvio_batch"] for r in records])})
    draw_bias(axes[0][1], steps, [r["bias_LE"][0] for r in records])
    vmax = max(max(max(row) for row in _shares(r["loads_LE"])) for r in (records[0], records[-1]))
    draw_heatmap(fig, axes[1][0], records[0]["loads_LE"], f"loads at step {steps[0]}", vmax)
    draw_heatmap(fig, axes[1][1], records[-1]["loads_LE"], f"loads at step {steps[-1]}", vmax)
    fig.suptitle(f"moe_balance: {run_dir}")
    return _save(fig, output)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
