"""A study's report: the results table and quality-vs-cost plots with their Pareto frontiers, as Markdown
and self-contained HTML (same helpers as the evaluation report)."""

from __future__ import annotations

from pathlib import Path

from finpipe.evaluation.report import html_images, html_page, html_table, md_table
from finpipe.studies.pareto import pareto_front, pareto_plot_png


def pareto_plots(rows: list[dict], label: str, objectives: list[tuple[str, str]], out_dir: Path,
                 quality: str = "quality") -> tuple[dict[str, Path], dict[str, list[str]]]:
    """One plot per (cost column, caption): ``quality`` (higher is better) against the cost (lower is better),
    frontier highlighted. Returns (plots by caption, frontier labels by caption)."""
    plots: dict[str, Path] = {}
    fronts: dict[str, list[str]] = {}
    for cost, caption in objectives:
        usable = [r for r in rows if r.get(cost) is not None and r.get(quality) is not None]
        if len(usable) < 2:
            continue
        flags = pareto_front(usable, maximize=[quality], minimize=[cost])
        fronts[caption] = [r[label] for r, on in zip(usable, flags) if on]
        plots[f"{quality} vs {caption}"] = pareto_plot_png(
            usable, x=cost, y=quality, label_key=label, path=out_dir / f"pareto_{cost}.png",
            title=f"{quality} vs {caption} (frontier highlighted)")
    return plots, fronts


def render_study(title: str, rows: list[dict], columns: list[str], out_dir: Path, summary: list[tuple[str, str]],
                 plots: dict[str, Path]) -> tuple[Path, Path]:
    """Write ``report.md`` and a self-contained ``report.html``: summary, results table, plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", "", *[f"- **{k}**: {v}" for k, v in summary], "", "## Results", ""]
    md += md_table(rows, columns)
    for caption, image in plots.items():
        md += ["", f"## {caption}", "", f"![{caption}]({image.name})"]
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md) + "\n")
    html_path = out_dir / "report.html"
    html_path.write_text(html_page(title, summary, f"<h2>Results</h2>{html_table(rows, columns)}{html_images(plots)}"))
    return md_path, html_path
