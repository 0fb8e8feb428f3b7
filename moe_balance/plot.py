"""Pictures of balance (matplotlib, optional extra ``moe-balance[plot]``).

* :func:`plot_maxvio` - MaxVio against step, one line per method or run;
* :func:`plot_load_heatmap` - layer x expert load share, before and after balancing;
* :func:`plot_bias` - bias trajectories of one layer's experts;
* :func:`plot_run` - all three from a run's ``moe_balance_stats.jsonl``
  (``python -m moe_balance plot RUN_DIR -o balance.png``);
* :func:`balance_images` / :class:`BalanceImages` - the load heatmap and MaxVio curve as image arrays,
  sent to TensorBoard / W&B while training by the HF, Lightning and Accelerate integrations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
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


# ---------------------------------------------------------------- images while training
HEATMAP_TAG = "moe_balance/load_heatmap"
MAXVIO_TAG = "moe_balance/maxvio_curve"


def _figure_to_array(fig) -> Any:
    """RGB ``uint8`` array ``[H, W, 3]`` of an off-screen figure (Agg canvas, no display, no pyplot state)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def balance_images(loads_LE: Sequence[Sequence[float]] | Any, steps: Sequence[float] = (),
                   maxvio: Sequence[float] = (), step: int | None = None, dpi: int = 80) -> dict[str, Any]:
    """Render the ``[layers, experts]`` load heatmap and the MaxVio curve as RGB arrays ``[H, W, 3]``.

    The one place the integrations' training-time pictures come from (HF callback, Lightning callback,
    Accelerate ``attach``); see :class:`BalanceImages` for when they are sent and where.

    Example:
        >>> images = balance_images([[30, 10, 0, 0], [10, 10, 10, 10]], steps=[1, 2], maxvio=[2.0, 1.0])
        >>> sorted(images), images[HEATMAP_TAG].shape[-1], str(images[HEATMAP_TAG].dtype)
        (['moe_balance/load_heatmap', 'moe_balance/maxvio_curve'], 3, 'uint8')
    """
    require("matplotlib")
    from matplotlib.figure import Figure
    loads = loads_LE.tolist() if hasattr(loads_LE, "tolist") else [list(row) for row in loads_LE]
    out: dict[str, Any] = {}
    fig = Figure(figsize=(6, 1.2 + 0.35 * len(loads)), dpi=dpi)
    ax = fig.add_subplot()
    vmax = max(2.0, max((max(row) for row in _shares(loads)), default=2.0))
    draw_heatmap(fig, ax, loads, "expert load" + (f" at step {step}" if step is not None else ""), vmax)
    fig.tight_layout()
    out[HEATMAP_TAG] = _figure_to_array(fig)
    fig = Figure(figsize=(6, 3.5), dpi=dpi)
    ax = fig.add_subplot()
    if len(steps):
        draw_maxvio(ax, {"MaxVio (step window)": (list(steps), list(maxvio))})
    ax.set_title("MaxVio, mean over layers", fontsize=10)
    fig.tight_layout()
    out[MAXVIO_TAG] = _figure_to_array(fig)
    return out


def accepts_images(target: Any) -> bool:
    """A TensorBoard ``SummaryWriter``-like object or a W&B run."""
    return hasattr(target, "add_image") or (type(target).__module__.split(".")[0] == "wandb"
                                             and hasattr(target, "log"))


def send_images(target: Any, images: Mapping[str, Any], step: int) -> bool:
    """Write ``images`` to one reporter: a TensorBoard ``SummaryWriter`` (torch's or tensorboardX's, also
    what Lightning's ``TensorBoardLogger.experiment`` and Accelerate's tensorboard tracker hold) or a W&B
    run (``wandb.Image``, committed with the reporter's next log). Returns False for anything else."""
    if hasattr(target, "add_image"):
        for tag, image in images.items():
            target.add_image(tag, image, global_step=step, dataformats="HWC")
        return True
    if type(target).__module__.split(".")[0] == "wandb" and hasattr(target, "log"):
        import wandb
        target.log({tag: wandb.Image(image) for tag, image in images.items()}, commit=False)
        return True
    return False


class BalanceImages:
    """Every ``every``-th logging event (the first included), render :func:`balance_images` and send it.

    Keeps the MaxVio history of the logging events it saw (the curve). ``every=0`` turns it off. Nothing is
    rendered when no target can take an image; without matplotlib it warns once and stays off.

    Example:
        >>> import torch, moe_balance as mb
        >>> bal = mb.Balancer(num_layers=2, num_experts=4, top_k=1)
        >>> images = BalanceImages(every=2)
        >>> [images.log(step, bal, targets=[]) for step in (1, 2, 3)]  # no writer: nothing rendered
        [False, False, False]
        >>> images.steps
        [1, 2, 3]
    """

    def __init__(self, every: int = 10) -> None:
        if every < 0:
            raise ValueError(f"heatmap_every must be >= 0, got {every}")
        self.every = every
        self.steps: list[int] = []
        self.maxvio: list[float] = []
        self.events = 0
        self.sent = 0

    def log(self, step: int, balancer: Any, targets: Sequence[Any], maxvio: float | None = None) -> bool:
        """Record this logging event; on every ``every``-th one send the images to ``targets``."""
        if not self.every:
            return False
        value = balancer.metrics(per_layer=False)["maxvio_global"] if maxvio is None else maxvio
        self.steps.append(int(step))
        self.maxvio.append(float(value))
        self.events += 1
        targets = [target for target in targets if accepts_images(target)]
        if (self.events - 1) % self.every or not targets:
            return False
        try:
            images = balance_images(balancer.load_matrix(), self.steps, self.maxvio, step=step)
        except ImportError as exc:
            import warnings
            warnings.warn(f"moe_balance: no balance heatmaps ({exc}); set heatmap_every=0 to silence this",
                          RuntimeWarning, stacklevel=2)
            self.every = 0
            return False
        sent = [send_images(target, images, int(step)) for target in targets]
        self.sent += any(sent)
        return any(sent)
