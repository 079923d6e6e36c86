"""Curves PNG and the final console table."""
from __future__ import annotations

from pathlib import Path

_SKIP = {"round", "wall_s", "clients", "bytes_up", "bytes_down", "num_examples"}


def metric_names(history: list[dict]) -> list[str]:
    names: list[str] = []
    for rec in history:
        for k, v in rec.items():
            if k not in _SKIP and not k.endswith("_s") and isinstance(v, (int, float)) and k not in names:
                names.append(k)
    return names


def write_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = metric_names(history)
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4 * max(1, len(names)), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        pts = [(h["round"], h[name]) for h in history if name in h]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3)
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_table(summary: dict):
    from rich.table import Table

    t = Table(title=f"{summary['algorithm']}: {summary['rounds']} rounds in {summary['wall_s']:.1f} s")
    t.add_column("metric")
    t.add_column("round 0", justify="right")
    t.add_column("final", justify="right")
    t.add_column("change", justify="right")
    for k, v0 in summary["initial"].items():
        v1 = summary["final"][k]
        t.add_row(k, f"{v0:.4f}", f"{v1:.4f}", f"{v1 - v0:+.4f}")
    t.caption = (
        f"up {summary['bytes_up'] / 1e6:.1f} MB, down {summary['bytes_down'] / 1e6:.1f} MB, "
        f"peak RSS {summary['peak_rss_mb']:.0f} MB (all processes)"
    )
    return t
