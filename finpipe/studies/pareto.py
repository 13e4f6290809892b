"""Pareto frontiers over result rows (dicts), and a plot of one two-objective frontier.

A point is dominated when another point is at least as good on every objective and strictly better on at
least one; the frontier is every point nothing dominates. Identical points do not dominate each other
(neither is strictly better), so duplicates stay on the frontier together.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence


def _value(point: dict, key: str, index: int) -> float:
    value = point.get(key)
    # a missing or NaN objective cannot be compared: refuse rather than silently rank it
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"point {index} has no numeric value for objective {key!r}: {value!r}")
    return float(value)


def pareto_front(points: Sequence[dict], maximize: Sequence[str], minimize: Sequence[str]) -> list[bool]:
    """One flag per point, True when no other point dominates it (O(n²), fine for study-sized tables)."""
    maximize, minimize = list(maximize), list(minimize)
    if not maximize and not minimize:
        raise ValueError("pareto_front needs at least one objective to maximize or minimize")
    overlap = set(maximize) & set(minimize)
    if overlap:
        raise ValueError(f"objectives cannot be both maximized and minimized: {sorted(overlap)}")
    # orient every objective so that larger is better: then domination is a plain component-wise comparison
    vectors = [[_value(p, k, i) for k in maximize] + [-_value(p, k, i) for k in minimize]
               for i, p in enumerate(points)]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [not any(dominates(other, v) for j, other in enumerate(vectors) if j != i) for i, v in enumerate(vectors)]


def pareto_plot_png(rows: Sequence[dict], x: str, y: str, label_key: str, path: Path, title: str,
                    x_lower_is_better: bool = True) -> Path:
    """Scatter ``y`` (higher is better) against ``x``; the frontier is highlighted, joined and every point labelled.

    Rows without a value for ``x`` or ``y`` (e.g. a skipped variant) are left out of the plot.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: runs in Dagster workers and tests
    import matplotlib.pyplot as plt

    shown = [r for r in rows if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))]
    flags = pareto_front(shown, maximize=[y] + ([] if x_lower_is_better else [x]),
                         minimize=[x] if x_lower_is_better else []) if shown else []
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    others = [r for r, f in zip(shown, flags) if not f]
    front = sorted((r for r, f in zip(shown, flags) if f), key=lambda r: r[x])
    if others:
        ax.scatter([r[x] for r in others], [r[y] for r in others], color="#999999", label="dominated", zorder=2)
    if front:
        ax.plot([r[x] for r in front], [r[y] for r in front], color="#d62728", marker="o", linewidth=1.5,
                label="Pareto frontier", zorder=3)
    _label_points(ax, shown, x, y, label_key)
    if not shown:
        ax.text(0.5, 0.5, "no measured points", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"{x} ({'lower' if x_lower_is_better else 'higher'} is better)")
    ax.set_ylabel(f"{y} (higher is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if shown:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _label_points(ax, rows: Sequence[dict], x: str, y: str, label_key: str) -> None:
    """One label per position (coincident points, e.g. a model and its barely-changed healed copy, share one
    comma-joined label); neighbours along x get staggered offsets so their labels do not overprint."""
    if not rows:
        return
    xs, ys = [float(r[x]) for r in rows], [float(r[y]) for r in rows]
    x_tol = (max(xs) - min(xs)) / 200 or 1e-12
    y_tol = (max(ys) - min(ys)) / 200 or 1e-12
    groups: list[tuple[float, float, list[str]]] = []
    for r, px, py in zip(rows, xs, ys):
        for gx, gy, names in groups:
            if abs(gx - px) <= x_tol and abs(gy - py) <= y_tol:
                names.append(str(r.get(label_key, "")))
                break
        else:
            groups.append((px, py, [str(r.get(label_key, ""))]))
    offsets = [(4, 4), (4, -11), (4, 13), (4, -20)]
    for i, (gx, gy, names) in enumerate(sorted(groups, key=lambda g: (g[0], g[1]))):
        ax.annotate(", ".join(names), (gx, gy), textcoords="offset points", xytext=offsets[i % len(offsets)],
                    fontsize=8)
