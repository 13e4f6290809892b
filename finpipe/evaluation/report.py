"""The evaluation report: one self-contained HTML file (images inlined) and its Markdown twin, with the same
numbers as ``evaluation.json``.

Sections: the decision and what trained; the strict golden-set metrics with 95% intervals, base vs adapter vs
champion; the seen and held-out-wording parts; the end-to-end evaluation (golden and wild questions through the
answering path) with its wrong wild answers; the paired differences (established or not); the forgetting
probe; the learning curve (strict metrics vs training tokens); validation; loss curves; per-family bars;
sample golden answers with what was wrong in each.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from finpipe.evaluation.evaluate import ANSWER_METRICS, HEADLINE_METRICS, STRICT_METRICS, quality_score

LABELS = {"number_correctness": "number correctness", "label_correctness": "label correctness",
          "exact_match": "exact match", "format_validity": "format validity", "token_f1": "token F1 (overlap)",
          "rouge_l": "ROUGE-L (overlap)"}


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _with_ci(value, ci) -> str:
    if value is None:
        return "–"
    return f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.3f}"


def metrics_rows(variants: dict[str, dict | None]) -> list[dict]:
    """One row per metric, one column per variant (plain numbers; None where not scored): the UI table."""
    rows = []
    for where in ("golden", "val"):
        for metric in ANSWER_METRICS:
            rows.append({"metric": f"{where} {LABELS[metric]}"} | {
                name: ((s or {}).get(where) or {}).get("overall", {}).get(metric) for name, s in variants.items()})
        rows.append({"metric": f"{where} loss"} | {name: ((s or {}).get(where) or {}).get("loss")
                                                   for name, s in variants.items()})
    rows.append({"metric": "golden strict quality"} | {
        name: quality_score(s["golden"]["overall"]) if s and s.get("golden") else None for name, s in variants.items()})
    rows.append({"metric": "forgetting probe"} | {name: ((s or {}).get("forgetting") or {}).get("score")
                                                  for name, s in variants.items()})
    rows.append({"metric": "latency of one answer (s)"} | {name: ((s or {}).get("val") or {}).get("latency_s")
                                                           for name, s in variants.items()})
    return [r for r in rows if any(v is not None for k, v in r.items() if k != "metric")]  # measured only


def headline_rows(variants: dict[str, dict | None]) -> list[dict]:
    """Golden-set strict metrics as 'value [low, high]' per variant, then loss and the probe."""
    present = {n: s for n, s in variants.items() if s and s.get("golden")}
    rows = []
    for metric in HEADLINE_METRICS:
        rows.append({"golden set": LABELS[metric]} | {
            n: _with_ci(s["golden"]["overall"].get(metric), (s["golden"].get("ci") or {}).get(metric))
            for n, s in present.items()})
    rows.append({"golden set": "strict quality (mean of the strict metrics)"} | {
        n: _fmt(quality_score(s["golden"]["overall"])) for n, s in present.items()})
    for metric in ("token_f1", "rouge_l"):
        rows.append({"golden set": LABELS[metric]} | {n: _fmt(s["golden"]["overall"].get(metric))
                                                      for n, s in present.items()})
    rows.append({"golden set": "loss (reference answers)"} | {n: _fmt(s["golden"].get("loss")) for n, s in present.items()})
    rows.append({"golden set": "forgetting probe (general questions)"} | {
        n: _fmt((variants[n].get("forgetting") or {}).get("score")) for n in present})
    return rows


def parts_rows(variants: dict[str, dict | None]) -> list[dict]:
    rows = []
    for name, s in variants.items():
        if not s or not s.get("golden"):
            continue
        for part, means in (s["golden"].get("parts") or {}).items():
            rows.append({"model": name, "part": "held-out wording" if part == "paraphrase" else "training wording"}
                        | {LABELS[m]: _fmt(means.get(m)) for m in HEADLINE_METRICS})
    return rows


E2E_LABELS = LABELS | {"relevance": "relevance", "verified": "verified", "refusal_correctness": "refusal correct",
                       "invented_numbers": "invented numbers"}
E2E_PART_NAMES = {"seen": "golden, training wording", "paraphrase": "golden, held-out wording",
                  "wild": "wild (as people type)", "unanswerable": "unanswerable"}


def end_to_end_rows(variants: dict[str, dict | None]) -> list[dict]:
    """Per model and part of the end-to-end evaluation: n and each metric as 'value [low, high]'."""
    rows = []
    for name, s in variants.items():
        parts = (((s or {}).get("end_to_end") or {}).get("summary") or {}).get("parts") or {}
        for part, got in parts.items():
            rows.append({"model": name, "part": E2E_PART_NAMES.get(part, part), "n": got["n"]} | {
                E2E_LABELS[k]: _with_ci(v, (got.get("ci") or {}).get(k)) for k, v in got["means"].items()})
    return rows


def wild_family_rows(variants: dict[str, dict | None]) -> list[dict]:
    rows = []
    for name, s in variants.items():
        per_family = (((s or {}).get("end_to_end") or {}).get("summary") or {}).get("wild_per_family") or {}
        for family, means in per_family.items():
            rows.append({"model": name, "family": family} | {E2E_LABELS[k]: _fmt(v) for k, v in means.items()})
    return rows


def cut(text: str, limit: int) -> str:
    """``text`` within ``limit`` characters, cut at a word and marked with "…" when it had to be cut."""
    if len(text) <= limit:
        return text
    head = text[:limit - 1]
    return (head.rsplit(" ", 1)[0] if " " in head else head).rstrip(" ,;:") + "…"


def wild_misses(e2e_answers: dict[str, list[dict]], limit: int = 8) -> list[dict]:
    """The challenger's wild and unanswerable answers that were wrong, with what was wrong."""
    out = []
    for row in e2e_answers.get("adapter") or []:
        wrong = row.get("refusal_correctness") == 0.0 or (row["part"] == "wild" and (
            row.get("number_correctness", 1) < 1 or (row.get("label_correctness") or 1) < 1 or not row.get("relevance")))
        if row["part"] in ("wild", "unanswerable") and wrong:
            out.append({"question": row["question"], "family": row["family"], "grounded as": row.get("grounded_as"),
                        "answer": cut(row["answer"], 160), "wrong": cut("; ".join(row.get("problems") or []), 200)})
    return out[:limit]


def difference_rows(differences: dict) -> list[dict]:
    rows = []
    for pair, per_metric in differences.items():
        for metric, d in per_metric.items():
            if d is None:
                continue
            mean, lo, hi = d
            verdict = "higher" if lo > 0 else "lower" if hi < 0 else "not established"
            rows.append({"comparison": pair, "metric": LABELS[metric], "difference": f"{mean:+.3f}",
                         "95% interval": f"[{lo:+.3f}, {hi:+.3f}]", "verdict": verdict})
    return rows


def forgetting_rows(variants: dict[str, dict | None]) -> list[dict]:
    """The probe's questions where the models differ (all of them when none differs)."""
    probes = {n: {r["question"]: r for r in (s.get("forgetting") or {}).get("rows", [])}
              for n, s in variants.items() if s and s.get("forgetting")}
    if not probes:
        return []
    questions = list(next(iter(probes.values())))
    differing = [q for q in questions if len({p[q]["right"] for p in probes.values() if q in p}) > 1] or questions
    return [{"question": q} | {n: ("right: " if p[q]["right"] else "wrong: ") + cut(p[q]["answer"], 90)
                               for n, p in probes.items() if q in p} for q in differing]


def learning_curve_png(curve: list[dict], path: Path, title: str) -> Path | None:
    points = [p for p in curve if p.get("number_correctness") is not None or p.get("val_loss") is not None]
    if len(points) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [p["tokens"] for p in points]
    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=100)
    for metric in (*STRICT_METRICS, "format_validity"):
        values = [p.get(metric) for p in points]
        if any(v is not None for v in values):
            ax.plot(tokens, [v if v is not None else float("nan") for v in values], marker="o", label=LABELS[metric])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training tokens (cumulative)")
    ax.set_ylabel("validation answers, strict")
    ax.grid(alpha=0.3)
    loss = ax.twinx()
    loss.plot(tokens, [p.get("val_loss") for p in points], color="gray", linestyle="--", label="val loss")
    loss.set_ylabel("validation loss")
    lines, names = ax.get_legend_handles_labels()
    more, more_names = loss.get_legend_handles_labels()
    ax.legend(lines + more, names + more_names, fontsize=8, loc="center right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def family_bars_png(variants: dict[str, dict | None], path: Path, where: str = "golden") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {n: s for n, s in variants.items() if s and s.get(where)}
    families = sorted({f for s in shown.values() for f in s[where]["per_family"]})
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.4), dpi=100, sharey=True)  # 960 px: inside the page and the UI
    width = 0.8 / max(1, len(shown))
    for ax, metric in zip(axes, STRICT_METRICS):
        for i, (name, scores) in enumerate(shown.items()):
            values = [(scores[where]["per_family"].get(f) or {}).get(metric) or 0.0 for f in families]
            ax.bar([x + i * width for x in range(len(families))], values, width, label=name)
        ax.set_xticks([x + width * (len(shown) - 1) / 2 for x in range(len(families))], families, rotation=30)
        ax.set_title(f"{LABELS[metric]} per family ({where})")
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")  # the rotated family names stay inside the image
    plt.close(fig)
    return path


def sample_answers(golden_answers: dict[str, list[dict]], per_family: int = 1) -> list[dict]:
    """Per family, ``per_family`` golden questions of each part with every variant's answer and its problems."""
    first = golden_answers.get("adapter") or next(iter(golden_answers.values()), [])
    picked, seen = [], {}
    for row in first:
        key = (row["family"], row.get("part", "seen"))
        if seen.get(key, 0) < per_family:
            seen[key] = seen.get(key, 0) + 1
            picked.append(row)
    out = []
    for row in picked:
        entry = {"family": row["family"], "part": row.get("part", "seen"), "question": row["question"],
                 "reference": row["reference"], "answers": {}}
        for name, rows in golden_answers.items():
            match = next((r for r in rows if r["id"] == row["id"]), None)
            if match:
                entry["answers"][name] = (match["answer"], match.get("problems") or [])
        out.append(entry)
    return out


def verdict(evaluation: dict, decision) -> tuple[str, list[tuple[str, str]]]:
    """The report's first words: promoted or not and why, in one sentence, then the headline numbers of the
    challenger (and of the champion it was compared with)."""
    sentence = ("Promoted: this adapter is the new champion. " if decision.promote
                else "Not promoted: the champion stays. ") + decision.reason[:1].upper() + decision.reason[1:]
    numbers = []
    for name in ("adapter", "champion"):
        scores = evaluation["variants"].get(name) or {}
        golden = (scores.get("golden") or {}).get("overall") or {}
        if not golden:
            continue
        parts = (((scores.get("end_to_end") or {}).get("summary") or {}).get("parts") or {}).get("wild") or {}
        wild = parts.get("means") or {}
        said = [f"golden {LABELS[m]} {golden[m]:.3f}" for m in HEADLINE_METRICS if golden.get(m) is not None]
        said += [f"wild questions end to end: numbers {wild['number_correctness']:.3f}"] \
            if wild.get("number_correctness") is not None else []
        forgetting = (scores.get("forgetting") or {}).get("score")
        said += [f"forgetting probe {forgetting:.3f}"] if forgetting is not None else []
        label = "this adapter" if name == "adapter" else f"champion {evaluation['champion']['run_id']}" \
            if evaluation.get("champion") else "champion"
        numbers.append((label, ", ".join(said)))
    return sentence, numbers


def md_table(rows: list[dict], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|") for c in columns) + " |" for r in rows]


def html_table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_images(images: dict[str, Path]) -> str:
    return "".join(f"<h2>{html.escape(c)}</h2><img alt='{html.escape(c)}' src='data:image/png;base64,"
                   f"{base64.b64encode(p.read_bytes()).decode()}'>" for c, p in images.items())


def html_page(title: str, summary: list[tuple[str, str]], body: str, verdict_box: str = "") -> str:
    """A self-contained page: inline CSS, images as data URIs; opens from disk, no network."""
    esc = html.escape
    items = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in summary)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title><style>
body{{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}
th{{background:#f4f4f4}}img{{max-width:100%}}.sample{{margin:1em 0}}.bad{{color:#a00;font-size:90%}}
.verdict{{border:2px solid;border-radius:6px;padding:.6em 1em;margin:1em 0}}.verdict p{{margin:.3em 0}}
.promoted{{border-color:#2a7;background:#effaf3}}.kept{{border-color:#c80;background:#fff8ec}}</style></head><body>
<h1>{esc(title)}</h1>{verdict_box}<ul>{items}</ul>{body}</body></html>"""


def _columns(rows: list[dict]) -> list[str]:
    out: list[str] = []
    for r in rows:
        out += [k for k in r if k not in out]
    return out


def render_evaluation(evaluation: dict, training: dict, decision, out_dir: Path) -> tuple[Path, Path, dict[str, Path]]:
    """Write ``report.md`` and ``report.html`` into ``out_dir``; returns both paths and the images they show."""
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = {k: v for k, v in evaluation["variants"].items() if v}
    images: dict[str, Path] = {}
    curve = learning_curve_png(training.get("curve") or [], out_dir / "learning_curve.png",
                               "learning curve (validation questions, greedy)")
    if curve:
        images["Learning curve: strict metrics vs training tokens"] = curve
    loss_png = Path(evaluation["adapter_path"]) / "loss.png"
    if loss_png.exists():
        images["Adapter loss curves"] = loss_png
    images["Per-family strict metrics (golden set)"] = family_bars_png(variants, out_dir / "per_family.png")

    plan = training.get("device_plan") or {}
    trained_as = "QLoRA (4-bit NF4 base)" if training.get("quantization") == "nf4" else "LoRA (unquantized base)"
    summary = [
        ("run", evaluation["run_id"]), ("base model", evaluation["base"]["name"]),
        ("trained as", f"{trained_as}, {training.get('precision')} on {training.get('device')}"),
        ("device plan", training.get("device_note", "")),
        ("why", "; ".join(str(plan[k]) for k in ("quantization_reason", "gradient_checkpointing_reason") if k in plan)),
        ("training", f"{training.get('steps')} steps, {training.get('train_tokens', 0):,} tokens in "
                     f"{training.get('seconds')} s ({training.get('tokens_per_s')} tokens/s), stopped by "
                     f"{training.get('stopped_by') or 'early stopping'}; cumulative tokens "
                     f"{training.get('cumulative_train_tokens', 0):,}"
                     + (f"; warm start from {training['warm_start']}" if training.get("warm_start") else "")),
        ("champion before this run", evaluation["champion"]["run_id"] if evaluation["champion"] else "none"),
        ("golden set", f"{evaluation['golden_samples']} samples "
                       f"({', '.join(f'{n} {p}' for p, n in _part_counts(evaluation).items())}), "
                       f"hash {evaluation['golden_hash']}"),
        ("promotion decision", ("promote: " if decision.promote else "keep the champion: ") + decision.reason),
        ("evaluated at", evaluation["evaluated_at"]),
    ]
    sections: list[tuple[str, list[dict], str]] = [
        ("Golden set, strict metrics (95% bootstrap intervals)", headline_rows(variants),
         "Strict: a number counts only in its own slot, for the right ticker, with the right value and sign; a label "
         "only when it is the one label of its vocabulary the answer names; exact match is the whole answer word for "
         "word. Intervals are percentile bootstraps over the golden questions."),
        ("Training wording vs held-out wording", parts_rows(variants),
         "Held-out wordings (finpipe/evaluation/paraphrases.py) never appear in training."),
        ("End to end: the questions alone, answered as `finpipe ask` and `serve` answer them",
         end_to_end_rows(variants),
         "The tables above give the model each golden sample's ideal context. Here the question alone goes through "
         "the answering path (ground() picks the facts, out-of-scope questions are refused, the answer is verified), "
         "with the lake as on the sample's date. Wild: the golden samples re-asked the way people type "
         "(finpipe/evaluation/wild.py, never in training). Relevance and verified: the server's verifier. "
         "Unanswerable: right only when the answer says the data does not cover it and invents no number."),
        ("Wild questions per family", wild_family_rows(variants), ""),
        ("Wrong wild answers (challenger)", wild_misses(evaluation.get("end_to_end_answers") or {}), ""),
        ("Differences (paired over the same golden questions)", difference_rows(evaluation.get("differences") or {}),
         "A difference is established only when its 95% interval excludes zero."),
        ("Forgetting probe (general questions; questions where the models differ)", forgetting_rows(variants),
         "Promotion refuses an adapter clearly below the base here."),
        ("All metrics (validation: a few answers per family; golden: the whole set)", metrics_rows(variants), ""),
    ]
    examples = sample_answers(evaluation.get("golden_answers") or {})

    sentence, headline = verdict(evaluation, decision)
    md = [f"# finpipe evaluation — {evaluation['run_id']}", "", f"> **{sentence}**"] + \
        [f"> {who}: {numbers}  " for who, numbers in headline] + [""] + [f"- **{k}**: {v}" for k, v in summary]
    for title, rows, note in sections:
        md += ["", f"## {title}", ""] + ([note, ""] if note else []) + (md_table(rows, _columns(rows)) if rows else ["–"])
    for caption, image in images.items():
        md += ["", f"## {caption}", "", f"![{caption}]({image.name})"]
    md += ["", "## Sample golden answers", ""]
    for e in examples:
        wording = "held-out wording" if e["part"] == "paraphrase" else "training wording"
        md += [f"**{e['family']}** ({wording}) — {e['question']}", "", f"- reference: {e['reference']}"]
        for name, (answer, problems) in e["answers"].items():
            md.append(f"- {name}: {answer or '(empty)'}" + (f"  \n  _wrong: {'; '.join(problems)}_" if problems else ""))
        md.append("")
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md))

    esc = html.escape
    body = "".join(f"<h2>{esc(t)}</h2>" + (f"<p>{esc(n)}</p>" if n else "") + (html_table(r, _columns(r)) if r else "–")
                   for t, r, n in sections)
    body += html_images(images) + "<h2>Sample golden answers</h2>"
    for e in examples:
        wording = "held-out wording" if e["part"] == "paraphrase" else "training wording"
        body += (f"<div class='sample'><h3>{esc(e['family'])} ({wording}): {esc(e['question'])}</h3><table>"
                 f"<tr><th>reference</th><td>{esc(e['reference'])}</td></tr>")
        for name, (answer, problems) in e["answers"].items():
            bad = f"<div class='bad'>wrong: {esc('; '.join(problems))}</div>" if problems else ""
            body += f"<tr><th>{esc(name)}</th><td>{esc(answer or '(empty)')}{bad}</td></tr>"
        body += "</table></div>"
    html_path = out_dir / "report.html"
    verdict_box = (f"<div class='verdict {'promoted' if decision.promote else 'kept'}'><p><b>{esc(sentence)}</b></p>"
                   + "".join(f"<p>{esc(who)}: {esc(numbers)}</p>" for who, numbers in headline) + "</div>")
    html_path.write_text(html_page(f"finpipe evaluation — {evaluation['run_id']}", summary, body, verdict_box))
    return md_path, html_path, images


#: the report's section the Dagster UI shows (``summary_markdown``), without its secondary rows; the rest is in the
#: HTML and Markdown files (the verdict above it already gives the end-to-end numbers)
SUMMARY_SECTION = "Golden set, strict metrics"
SUMMARY_SKIPS = ("overlap", "loss", "strict quality")


def summary_markdown(report_md: str, full_report: Path) -> str:
    """The report's head for the Dagster UI's Markdown popup: the verdict and the strict golden metrics, and where
    the whole report is. Why short: the UI's dialog focuses its Close button, at the bottom, so a long report opened
    scrolled to its end (the whole report is 5,772 px tall); this one fits a 900 px window."""
    head, *sections = report_md.split("\n## ")
    keep = [head.split("\n- **", 1)[0].rstrip()]  # the title and the verdict, not the run's particulars
    for section in sections:
        title, _, body = section.partition("\n")
        if title.startswith(SUMMARY_SECTION):
            table = [line for line in body.splitlines()
                     if line.startswith("|") and not any(skip in line.split("|")[1] for skip in SUMMARY_SKIPS)]
            keep += ["", f"## {title}", ""] + table
    keep += ["", f"Everything else (end to end, differences, the run's particulars, charts, sample answers): "
             f"`{full_report}`"]
    return "\n".join(keep)


def _part_counts(evaluation: dict) -> dict[str, int]:
    rows = (evaluation.get("golden_answers") or {}).get("adapter") or []
    counts: dict[str, int] = {}
    for r in rows:
        name = "held-out wording" if r.get("part") == "paraphrase" else "training wording"
        counts[name] = counts.get(name, 0) + 1
    return counts
