"""What ``ftk finetune`` writes: the metrics as JSON lines while it trains, and at the end the
adapter, metrics.json and two figures (loss.png: train loss, its moving average and the eval
loss against the step; lr.png: the learning rate against the step), drawn with matplotlib, an
optional dependency: without it the figures are skipped with a one-line note on stderr. Under
torch.distributed rank 0 writes them all (the adapter is gathered by every rank first).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..integrations import _dist
from ..integrations.lora import save_lora
from ..integrations.reft import save_loreft
from . import plots

METHOD_NAMES = {"qlora": "QLoRA", "lora": "LoRA", "loreft": "LoReFT", "full": "full"}  # as titles spell them
METRICS_LOG = "metrics.jsonl"


class MetricsLog:
    """metrics.jsonl: one JSON object a step (step, loss, lr, tokens_per_s, memory_mib, and
    eval_loss on the steps that evaluate), flushed as it is written, rank 0 only. ``start(rows)``
    begins the file with the rows a resumed run already has (a fresh run: none)."""

    def __init__(self, out_dir: str | os.PathLike | None):
        self.path = Path(out_dir) / METRICS_LOG if out_dir is not None and _dist.rank() == 0 else None
        self._f = None

    def start(self, rows: Sequence[dict]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w", encoding="utf-8")  # noqa: SIM115  (closed by close())
        for row in rows:
            self.write(row)

    def write(self, row: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def adapter_writer(model, method: str):
    """``write(dir)``: the adapter's files into dir (every rank calls it; rank 0 writes)."""
    if method == "loreft":
        return lambda d: save_loreft(model, d)
    return lambda d: save_lora(model, d)


def smoothed(losses: Sequence[float], window: int | None = None) -> list[float]:
    """A centred moving average: each point the mean of the finite losses within window // 2
    steps of it (window: n / 10 rounded up to an odd number, at least 3; shorter at the ends),
    so it follows the trend without an exponential average's lag; NaN where none is finite."""
    n = len(losses)
    half = (window or max(3, -(-n // 10))) // 2
    total, count = [0.0], [0]  # prefix sums over the finite losses
    for v in losses:
        ok = math.isfinite(v)
        total.append(total[-1] + (v if ok else 0.0))
        count.append(count[-1] + ok)
    out = []
    for i in range(n):
        lo, hi = max(0, i - half), min(n, i + half + 1)
        k = count[hi] - count[lo]
        out.append((total[hi] - total[lo]) / k if k else float("nan"))
    return out


def _pyplot(path):
    try:
        return plots.pyplot()
    except plots.PlotsUnavailable as e:
        print(f"{Path(path).name} not written: {e}", file=sys.stderr)
        return None


def _finite(values: Sequence[float]) -> list[float]:
    return [v if math.isfinite(v) else float("nan") for v in values]  # inf: a gap, as NaN


def loss_curve_png(
    losses: Sequence[float],
    path: str | os.PathLike,
    title: str = "fine-tuning loss",
    eval_points: Sequence[tuple[int, float]] = (),
):
    """The train loss per step as a PNG drawn with matplotlib: x axis "step" (1..n), y axis
    "loss", the title given; from 10 steps on, the moving average too (``smoothed``), and the
    eval loss at its (step, loss) points. Returns the (closed) Figure, or None when matplotlib
    is missing: then one line on stderr says so and how to install it, and nothing is written."""
    plt = _pyplot(path)
    if plt is None:
        return None

    steps = list(range(1, len(losses) + 1))
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    many = len(losses) >= 10  # below that each point is marked and read on its own
    ax.plot(
        steps,
        _finite(losses),
        color="#2860c0",
        linewidth=1.0,
        alpha=0.55 if many else 1.0,
        marker=None if many else "o",
        markersize=3,
        label="train loss",
    )
    if many:
        ax.plot(steps, smoothed(losses), color="#c04028", linewidth=1.6, label="moving average")
    if eval_points:
        xs, ys = zip(*eval_points)
        ax.plot(xs, _finite(ys), color="#208040", linewidth=1.4, marker="s", markersize=4, label="eval loss")
    if many or eval_points:
        ax.legend(loc="upper right", fontsize=8)
    return _save(plt, fig, ax, path, "loss", title)


def _save(plt, fig, ax, path, ylabel: str, title: str):
    """Labels the axes ("step", ylabel), titles, grids and writes the figure; returns it closed."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, linewidth=0.4, alpha=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def lr_png(lrs: Sequence[float], path: str | os.PathLike, title: str = "learning rate"):
    """The learning rate of each step as a PNG: x axis "step", y axis "learning rate"; the
    (closed) Figure, or None without matplotlib (as loss_curve_png)."""
    plt = _pyplot(path)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 2.8))
    ax.plot(range(1, len(lrs) + 1), lrs, color="#7040a0", linewidth=1.4, marker="o" if len(lrs) < 10 else None)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return _save(plt, fig, ax, path, "learning rate", title)


def write_outputs(model, method: str, out_dir: str | os.PathLike, metrics: dict, history: Sequence[dict]) -> list[Path]:
    """The adapter (PEFT's files for LoRA/QLoRA, safetensors + JSON for LoReFT), metrics.json,
    loss.png and lr.png (skipped, with a note on stderr, without matplotlib) into out_dir, from
    the per-step ``history`` rows; returns the paths written (rank 0 writes; others return [])."""
    out = Path(out_dir)
    adapter_writer(model, method)(out / "adapter")  # on a sharded model every rank gathers
    if _dist.rank() != 0:
        return []
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    name = f"{METHOD_NAMES.get(method, method)} fine-tuning of {model_name(model, metrics)}"
    losses = [row["loss"] for row in history]
    evals = [(row["step"], row["eval_loss"]) for row in history if "eval_loss" in row]
    written = [out / "adapter", out / "metrics.json"]
    if (out / METRICS_LOG).is_file():
        written.append(out / METRICS_LOG)
    if loss_curve_png(losses, out / "loss.png", title=name, eval_points=evals) is not None:
        written.append(out / "loss.png")
    if lr_png([row["lr"] for row in history], out / "lr.png", title=f"learning rate, {name}") is not None:
        written.append(out / "lr.png")
    return written


def model_name(model, metrics: dict) -> str:
    """A short name for the model: the last part of metrics["model"] (the folder or GGUF file
    loaded), else of its config's name_or_path, else its class name."""
    for where in (metrics.get("model"), getattr(getattr(model, "config", None), "name_or_path", None)):
        if where:
            return Path(str(where)).name or str(where)
    return type(model).__name__
