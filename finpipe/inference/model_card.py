"""The model card (README.md) of an exported model, written from its lineage: what it was trained from, on which
data, which gates the data passed, how it scores, and how the export was checked."""

from __future__ import annotations

from finpipe.instructions.samples import SYSTEM_PROMPT


def _metric(scores: dict | None, metric: str) -> str:
    if not scores:
        return "–"
    value, ci = scores.get("overall", {}).get(metric), (scores.get("ci") or {}).get(metric)
    if value is None:
        return "–"
    return f"{value:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _verdict(lineage: dict) -> list[str]:
    """The run registry's decision on this run, first thing after the summary: an export of a run finpipe refused
    to promote must not read like the champion's."""
    status, reason = lineage.get("status"), lineage.get("reason")
    if status == "rejected":
        return [f"**Not promoted: finpipe's promotion refused this run** ({reason or 'no reason recorded'}): it is "
                "not finpipe's champion.", ""]
    if status:
        return [f"Run registry status: {status}" + (f" ({reason})" if reason else "") + ".", ""]
    return []


def _opening(title: str, lineage: dict, tags: str) -> list[str]:
    """The YAML header, the title, what the model does, and the registry's verdict."""
    return [
        "---",
        "license: apache-2.0",
        f"base_model: {lineage.get('base_name', 'unknown')}",
        f"tags: [{tags}]",
        "---",
        f"# {title}",
        "",
        f"A financial data assistant fine-tuned by finpipe (run `{lineage.get('run_id')}`): "
        "it answers questions about a ticker's latest market data **given in the prompt** (a context block finpipe "
        "builds from its lake), restating the numbers exactly and labelling trend, risk, momentum, range and "
        "relative performance by documented rules. It does not know prices on its own. Not investment advice.",
        "",
        *_verdict(lineage),
    ]


def _prompt_format() -> list[str]:
    return [
        "## Prompt format",
        "",
        f"System: `{SYSTEM_PROMPT}`",
        "",
        "User turn (the context block is what grounds the answer):",
        "",
        "```",
        "Market data for AAPL (Apple Inc.) as of 2013-03-01:",
        "- annualized 20-day volatility: 17.78%",
        "- 1-day return: -0.49%",
        "- max drawdown over 252 days: -37.82%",
        "",
        "Question: How volatile is AAPL right now?",
        "```",
        "",
    ]


def _lineage(lineage: dict) -> list[str]:
    """The lineage section's lines on the base, the training, the data and its gates."""
    training = lineage.get("training") or {}
    return [
        "## Lineage",
        "",
        f"- base model: {lineage.get('base_name')} ({lineage.get('base_path')})",
        f"- trained as: {'QLoRA (4-bit NF4 base)' if training.get('quantization') == 'nf4' else 'LoRA'}, "
        f"{training.get('steps')} steps, {training.get('cumulative_train_tokens', training.get('train_tokens', 0)):,} "
        f"training tokens in all; {training.get('device_note', '')}",
        f"- data: {lineage.get('data_sources')} prices {lineage.get('train_first')} .. {lineage.get('train_last')} "
        f"(training); validation after {lineage.get('val_cutoff')}",
        f"- dataset gates passed: {', '.join(lineage.get('gates') or []) or 'unknown'}",
    ]


def _scores(lineage: dict, this: str) -> list[str]:
    """The golden-set scores of the base model and ``this`` (the model the card is about), with intervals."""
    evaluation = lineage.get("evaluation") or {}
    adapter = (evaluation.get("variants") or {}).get("adapter") or {}
    base = (evaluation.get("variants") or {}).get("base") or {}
    return [
        "## Scores (finpipe's frozen golden set, greedy, strict)",
        "",
        f"Golden set: {evaluation.get('golden_samples', '?')} questions (hash {evaluation.get('golden_hash', '?')}), "
        "half of them in wordings never used in training. 95% bootstrap intervals in brackets.",
        "",
        f"| metric | base model | {this} |",
        "|---|---|---|",
        *[f"| {label} | {_metric(base.get('golden'), key)} | {_metric(adapter.get('golden'), key)} |"
          for label, key in (("number correctness", "number_correctness"), ("label correctness", "label_correctness"),
                             ("exact match", "exact_match"), ("format validity", "format_validity"))],
        f"| forgetting probe (general questions) | {(base.get('forgetting') or {}).get('score', '–')} | "
        f"{(adapter.get('forgetting') or {}).get('score', '–')} |",
        "",
    ]


def model_card(name: str, lineage: dict, files: list[dict], parity: list[dict], license_note: str) -> str:
    """Markdown with a YAML header. ``lineage``: run id, base name, training report fields, the data window and
    sources, gates, the evaluation record; ``files``: the GGUF files; ``parity``: one row per checked file."""
    lines = [
        *_opening(name, lineage, "finpipe, gguf, finance, lora"),
        "## Files",
        "",
        "| file | type | size |",
        "|---|---|---|",
        *[f"| `{f['file']}` | {f['outtype']} | {f['size_bytes'] / 2**20:.1f} MiB |" for f in files],
        "| `Modelfile` | Ollama | |",
        "",
        "Run it: `ollama create finpipe -f Modelfile && ollama run finpipe`, or "
        f"`llama-cli -m {files[-1]['file'] if files else 'model.gguf'} -cnv` (llama.cpp). finpipe's own server "
        "(`finpipe serve`) adds the market-data context and checks every number of the answer.",
        "",
        *_prompt_format(),
        *_lineage(lineage),
        "- merged: the LoRA adapter folded into the base weights (peft `merge_and_unload`, float32), then written "
        "as GGUF with finpipe's exporter",
        "",
        *_scores(lineage, "this model"),
        "## Export check",
        "",
        "Each file was loaded back by a reader that did not write it (transformers' GGUF loader, and llama.cpp where "
        "llama-cpp-python is installed) and answered the golden questions greedily; its answers are compared with "
        "the merged model's at the same precision.",
        "",
        "| file | reader | answers identical | strict number correctness (file / reference) | "
        "strict label correctness (file / reference) | verdict |",
        "|---|---|---|---|---|---|",
        *[f"| `{p['file']}` | {p['reader']} | {p['identical']}/{p['answers']} | {p['number_correctness']} / "
          f"{p['reference_number_correctness']} | {p.get('label_correctness')} / {p.get('reference_label_correctness')} | "
          f"{'pass' if p['passed'] else 'FAIL'} ({p['rule']}) |" for p in parity],
        "",
        "## License",
        "",
        license_note,
        "",
    ]
    return "\n".join(lines)


def adapter_card(lineage: dict) -> str:
    """The model card of an adapter as training saved it (a PEFT folder, no export): what MLflow keeps with the
    adapter's run and model version. Same lineage and scores as an export's card."""
    return "\n".join([
        *_opening(f"finpipe adapter {lineage.get('run_id')}", lineage, "finpipe, peft, finance, lora"),
        "## Files",
        "",
        "A PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`, the tokenizer): load it on its "
        "base model with `peft.PeftModel.from_pretrained(base, folder)`, or ask finpipe (`finpipe ask`, `finpipe "
        "serve`), which adds the market-data context and checks every number of the answer.",
        "",
        *_prompt_format(),
        *_lineage(lineage),
        "",
        *_scores(lineage, "this adapter"),
    ])
