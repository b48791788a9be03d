"""PNG plots of a compare_servers.py run: one line per server against concurrency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server

import matplotlib.pyplot as plt
from matplotlib.ticker import NullLocator


def _series(rows: list[dict[str, Any]], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """server -> (concurrencies, values of `key`), in concurrency order."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in sorted(rows, key=lambda r: r["concurrency"]):
        xs, ys = out.setdefault(row["server"], ([], []))
        xs.append(row["concurrency"])
        ys.append(row["metrics"][key])
    return out


def _concurrency_axis(ax: Any, rows: list[dict[str, Any]]) -> None:
    ticks = sorted({r["concurrency"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("concurrent requests")


def plot_throughput(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for server, (xs, ys) in _series(rows, "output_throughput").items():
        ax.plot(xs, ys, marker="o", label=server)
    _concurrency_axis(ax, rows)
    ax.set_ylabel("output tokens/s")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_latency(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """TTFT and ITL, median solid and p99 dashed, each server in its own colour."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric in zip(axes, ("ttft", "itl"), strict=True):
        for i, (server, (xs, medians)) in enumerate(_series(rows, f"median_{metric}_ms").items()):
            colour = f"C{i}"
            ax.plot(xs, medians, marker="o", color=colour, label=f"{server} p50")
            _, p99s = _series(rows, f"p99_{metric}_ms")[server]
            ax.plot(xs, p99s, marker="x", linestyle="--", color=colour, label=f"{server} p99")
        ax.set_yscale("log")
        _concurrency_axis(ax, rows)
        ax.set_ylabel("ms")
        ax.set_title(f"{metric.upper()}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
