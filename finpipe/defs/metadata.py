"""Helpers that turn domain results into Dagster UI metadata."""

from __future__ import annotations

from pathlib import Path

import polars as pl


def markdown_table(frame: pl.DataFrame, max_rows: int = 20, float_digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table of the first ``max_rows`` rows."""
    if frame.width == 0:
        return "_(no columns)_"
    shown = frame.head(max_rows)

    def cell(v) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.{float_digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e6 else f"{v:.{float_digits}f}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * shown.width]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in shown.iter_rows()]
    if frame.height > max_rows:
        lines.append(f"\n_{frame.height - max_rows} more rows not shown_")
    return "\n".join(lines)


def markdown_with_inline_images(markdown: str, images: dict[str, Path]) -> str:
    """The UI cannot read files next to a report: replace ``![caption](file.png)`` with data-URI images."""
    from finpipe.training.plots import markdown_image

    for caption, image in images.items():
        markdown = markdown.replace(f"![{caption}]({image.name})", markdown_image(image, caption))
    return markdown


def tracking_metadata(summary: dict) -> dict:
    """``finpipe.tracking.Outcome.summary()`` as Dagster metadata: the MLflow run as a link, what was not logged as
    JSON."""
    import dagster as dg

    out: dict = {}
    for key, value in summary.items():
        if key == "mlflow_run":
            out[key] = dg.MetadataValue.url(value) if value else ""
        elif isinstance(value, list):
            out[key] = dg.MetadataValue.json(value)
        else:
            out[key] = value
    return out
