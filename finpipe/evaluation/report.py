"""The evaluation report: one self-contained HTML file (images inlined) and its Markdown twin.

Sections: the decision, the metrics table (base vs adapter vs champion), the adapter's loss curves,
per-family bars, and sample answers side by side.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from finpipe.evaluation.evaluate import ANSWER_METRICS

METRIC_ROWS = [  # (label, set, key): key "loss"/"perplexity"/"latency_s"/"tokens_per_s" or an answer metric
    ("validation loss", "val", "loss"), ("validation perplexity", "val", "perplexity"),
    *[(f"validation {m.replace('_', ' ')}", "val", m) for m in ANSWER_METRICS],
    ("golden loss", "golden", "loss"),
    *[(f"golden {m.replace('_', ' ')}", "golden", m) for m in ANSWER_METRICS],
    ("latency of one answer (s)", "val", "latency_s"), ("generation tokens/s (batch 1, KV cache)", "val", "tokens_per_s"),
]


def metric_value(scores: dict | None, where: str, key: str) -> float | None:
    if not scores or not scores.get(where):
        return None
    block = scores[where]
    return block.get(key) if key in block else block["overall"].get(key)


def metrics_rows(variants: dict[str, dict | None]) -> list[dict]:
    """One row per metric, one column per variant (None where a variant was not scored on that set)."""
    return [{"metric": label} | {name: metric_value(scores, where, key) for name, scores in variants.items()}
            for label, where, key in METRIC_ROWS]


def family_bars_png(variants: dict[str, dict | None], path: Path, where: str = "val") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {n: s for n, s in variants.items() if s and s.get(where)}
    families = sorted({f for s in shown.values() for f in s[where]["per_family"]})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), dpi=100, sharey=True)
    width = 0.8 / max(1, len(shown))
    for ax, metric in zip(axes, ("numeric_fidelity", "rouge_l")):
        for i, (name, scores) in enumerate(shown.items()):
            values = [(scores[where]["per_family"].get(f) or {}).get(metric) or 0.0 for f in families]
            ax.bar([x + i * width for x in range(len(families))], values, width, label=name)
        ax.set_xticks([x + width * (len(shown) - 1) / 2 for x in range(len(families))], families, rotation=30)
        ax.set_title(f"{metric.replace('_', ' ')} per family ({where})")
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def side_by_side(variants: dict[str, dict | None], answers: dict[str, list[dict]], per_family: int = 1) -> list[dict]:
    """A few validation samples (``per_family`` per family) with each variant's answer."""
    first = next(iter(answers.values()), [])
    picked, seen = [], {}
    for row in first:
        if seen.get(row["family"], 0) < per_family:
            seen[row["family"]] = seen.get(row["family"], 0) + 1
            picked.append(row)
    out = []
    for row in picked:
        entry = {"family": row["family"], "question": row["question"], "reference": row["reference"]}
        for name, rows in answers.items():
            match = next((r for r in rows if r["id"] == row["id"]), None)
            entry[name] = match["answer"] if match else None
        out.append(entry)
    return out


def md_table(rows: list[dict], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]


def html_table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_images(images: dict[str, Path]) -> str:
    return "".join(f"<h2>{html.escape(c)}</h2><img alt='{html.escape(c)}' src='data:image/png;base64,"
                   f"{base64.b64encode(p.read_bytes()).decode()}'>" for c, p in images.items())


def html_page(title: str, summary: list[tuple[str, str]], body: str) -> str:
    """A self-contained page: inline CSS, images as data URIs; opens from disk, no network."""
    esc = html.escape
    items = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in summary)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title><style>
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}
th{{background:#f4f4f4}}img{{max-width:100%}}.sample{{margin:1em 0}}</style></head><body>
<h1>{esc(title)}</h1><ul>{items}</ul>{body}</body></html>"""


def render(title: str, summary: list[tuple[str, str]], variants: dict[str, dict | None],
           answers: dict[str, list[dict]], images: dict[str, Path], out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["metric", *variants]
    rows = metrics_rows(variants)
    examples = side_by_side(variants, answers)

    md = [f"# {title}", ""]
    md += [f"- **{k}**: {v}" for k, v in summary] + ["", "## Metrics", ""]
    md += md_table(rows, columns)
    for caption, image in images.items():
        md += ["", f"## {caption}", "", f"![{caption}]({image.name})"]
    md += ["", "## Sample answers", ""]
    for e in examples:
        md += [f"**{e['family']}** — {e['question']}", "", f"- reference: {e['reference']}"]
        md += [f"- {n}: {e.get(n) if e.get(n) is not None else '–'}" for n in answers]
        md.append("")
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md))

    esc = html.escape
    samples = "".join(
        f"<div class='sample'><h3>{esc(e['family'])}: {esc(e['question'])}</h3><table>"
        f"<tr><th>reference</th><td>{esc(e['reference'])}</td></tr>"
        + "".join(f"<tr><th>{esc(n)}</th><td>{esc(e.get(n) or '–')}</td></tr>" for n in answers)
        + "</table></div>" for e in examples)
    body = f"<h2>Metrics</h2>{html_table(rows, columns)}{html_images(images)}<h2>Sample answers</h2>{samples}"
    html_path = out_dir / "report.html"
    html_path.write_text(html_page(title, summary, body))
    return md_path, html_path
