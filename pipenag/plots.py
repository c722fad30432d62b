"""Plots of comparisons and experiments (matplotlib, Agg backend; optional).

    python -c "from pipenag.plots import plot_compare_dir; plot_compare_dir('runs/cmp')"

Every function returns True when it wrote the PNG, and False (after saying why on stderr) when
matplotlib is not installed: plotting is never a reason for a run to fail.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        print("pipenag: matplotlib is not installed; skipping the plot (pip install matplotlib)",
              file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_compare(rows: Sequence[dict], path: str | Path, title: str = "") -> bool:
    """Validation loss against tokens (left) and against simulated pipeline time (right).

    Args:
        rows: pipenag.compare rows, each with "method" and "evals" (step, tokens, val_loss, sim_time).
        path: the PNG to write.
    """
    plt = _pyplot()
    if plt is None:
        return False
    legend_in = 0.18 * ((len(rows) + 1) // 2) + 0.15  # height of the legend below the axes
    fig, (ax_tok, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2 + legend_in))
    for r in rows:
        ev = [e for e in r["evals"] if e["val_loss"] == e["val_loss"]]  # drop NaN
        label = r["method"]
        if r.get("status", "ok") != "ok":
            label += f" ({r['status']} at update {r['updates']})"
        line, = ax_tok.plot([e["tokens"] for e in ev], [e["val_loss"] for e in ev], marker=".", label=label)
        ax_time.plot([e["sim_time"] for e in ev], [e["val_loss"] for e in ev], marker=".",
                     color=line.get_color())
    ax_tok.set_xlabel("training tokens")
    ax_time.set_xlabel("simulated pipeline time (block-forward units)")
    for ax in (ax_tok, ax_time):
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    _clip_ylim([ax_tok, ax_time], rows)
    if title:
        fig.suptitle(title)
    fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_in / (4.2 + legend_in), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _clip_ylim(axes, rows: Sequence[dict]) -> None:
    """Zoom on the informative range: from the best loss to the loss after the first eval."""
    losses = [e["val_loss"] for r in rows for e in r["evals"] if e["val_loss"] == e["val_loss"]]
    if len(losses) < 2:
        return
    firsts = sorted(r["evals"][0]["val_loss"] for r in rows if r["evals"])
    top = firsts[len(firsts) // 2] if firsts else max(losses)
    low = min(losses)
    if top > low:
        for ax in axes:
            ax.set_ylim(low - 0.05 * (top - low), top + 0.05 * (top - low))


def plot_compare_dir(out_dir: str | Path) -> bool:
    """Redraw DIR/loss.png from DIR/summary.json."""
    out = Path(out_dir)
    data = json.loads((out / "summary.json").read_text())
    return plot_compare(data["rows"], out / "loss.png")


def plot_lines(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, *,
               xlabel: str, ylabel: str, title: str = "", logx: bool = False, logy: bool = False,
               ylim: Optional[tuple[float, float]] = None) -> bool:
    """One line per named (x, y) series on one axis."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, (x, y) in series.items():
        ax.plot(x, y, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_panels(panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]], path: str | Path, *,
                xlabel: str, ylabel: str, title: str = "", logx: bool = False, logy: bool = False,
                styles: Optional[dict[str, dict]] = None) -> bool:
    """Side-by-side panels (shared y axis), each with named (x, y) series. Series whose names
    agree before " (" share a color; `styles` maps a series name to extra plot() keywords.
    Empty panels are left out; nothing is written (False) when all are empty."""
    panels = {name: series for name, series in panels.items() if series}
    if not panels:
        return False
    plt = _pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 0.8, 3.8), sharey=True, squeeze=False)
    colors: dict[str, str] = {}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel, series) in zip(axes[0], panels.items()):
        for name, (x, y) in series.items():
            key = name.split(" (")[0]
            color = colors.setdefault(key, cycle[len(colors) % len(cycle)])
            ax.plot(x, y, label=name, color=color, linewidth=1, **(styles or {}).get(name, {}))
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel(xlabel)
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(ylabel)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
