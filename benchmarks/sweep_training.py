"""The training sweep behind ``AdapterSpec``'s defaults: learning rate, rank, schedule and batch, each trained
for the same wall-time budget on the lake's split and scored strictly on its frozen golden set.

    python -m benchmarks.sweep_training [--minutes 4] [--configs NAME,...] [--json PATH] [--markdown PATH]

Each configuration runs the real ``finpipe.training.sft.train_adapter`` (budget, label balancing, learning
curve) and the real evaluation (``evaluate_model``: merged adapter at the inference precision, golden set,
strict metrics with 95% intervals). Run it after ``finpipe run`` (it needs the base model, the split and the
golden set); nothing else should use the cores meanwhile. Results: a JSON (default
``benchmarks/results/sweep_training.json``) and a Markdown table (``--markdown``, e.g. docs/training-sweep.md).
Adapters and checkpoints live in a temporary folder and are deleted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _common
from finpipe import runtime

NAME = "sweep_training"
#: name -> AdapterSpec overrides (on top of the spec's defaults and --minutes)
CONFIGS: dict[str, dict[str, Any]] = {
    "lr5e-4": {"learning_rate": 5e-4},
    "lr1e-3": {"learning_rate": 1e-3},
    "lr2e-3": {"learning_rate": 2e-3},
    "lr4e-3": {"learning_rate": 4e-3},
    "r8": {"lora_r": 8, "lora_alpha": 16},
    "r32": {"lora_r": 32, "lora_alpha": 64},
    "constant": {"lr_schedule": "constant"},
    "linear": {"lr_schedule": "linear"},
    "batch4": {"batch_size": 4},
    "batch2": {"batch_size": 2},
    "no-replay": {"general_replay_share": 0.0},
    "no-replay-lr2e-3": {"general_replay_share": 0.0, "learning_rate": 2e-3},
    "batch4-lr2e-3": {"batch_size": 4, "learning_rate": 2e-3},
    "batch2-lr2e-3": {"batch_size": 2, "learning_rate": 2e-3},
    "batch1": {"batch_size": 1},
    "batch2-constant": {"batch_size": 2, "lr_schedule": "constant"},
    "long-batch2": {"batch_size": 2, "eval_points": 6},
    "unbalanced": {"balance_labels": False},
    "dropout0.05": {"lora_dropout": 0.05},
    "all-layers": {"lora_layer_share": 1.0},
    "top-half": {"lora_layer_share": 0.5},
    "top-third": {"lora_layer_share": 1 / 3},
    "top-half-lr2e-3": {"lora_layer_share": 0.5, "learning_rate": 2e-3},
    "top-half-replay10": {"lora_layer_share": 0.5, "general_replay_share": 0.1},
    "replay40": {"general_replay_share": 0.4},
    "replay50": {"general_replay_share": 0.5},
    "replay50-lr1e-3": {"general_replay_share": 0.5, "learning_rate": 1e-3},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=None, help="training budget per configuration (default: the "
                   "spec's max_minutes)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="an AdapterSpec override applied to every configuration (repeatable)")
    p.add_argument("--json", help=f"results file (default benchmarks/results/{NAME}.json)")
    p.add_argument("--markdown", help="also write the results table as Markdown to this file")
    p.add_argument("--keep", help="keep each configuration's adapter in this folder (default: deleted)")
    args = p.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configurations {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    return args


def _typed(spec_cls, assignment: str) -> tuple[str, Any]:
    name, _, value = assignment.partition("=")
    kind = {f.name: f.type for f in dataclasses.fields(spec_cls)}.get(name)
    if kind is None:
        raise SystemExit(f"--set {assignment}: AdapterSpec has no field {name!r}")
    default = getattr(spec_cls, name)
    return name, (value.lower() in ("1", "true", "yes") if isinstance(default, bool) else type(default)(value))


def run_config(name: str, overrides: dict, golden, val, train, base: dict, workdir: Path, keep: Path | None) -> dict:
    from finpipe.evaluation.evaluate import EvalSpec, evaluate_model, quality_score
    from finpipe.training.sft import train_adapter
    from finpipe.training.spec import AdapterSpec

    spec = AdapterSpec(**overrides)
    started = time.perf_counter()
    report = train_adapter(base["path"], train, val, workdir / name / "job", workdir / name / "adapter", spec,
                           log=lambda line: print(f"  [{name}] {line}", flush=True))
    trained = time.perf_counter() - started
    scores = evaluate_model(name, base["path"], str(workdir / name / "adapter"), [], golden, EvalSpec(),
                            log=lambda line: print(f"  [{name}] {line}", flush=True), with_val=False)
    golden_scores = scores.golden
    if keep:
        shutil.copytree(workdir / name / "adapter", keep / name, dirs_exist_ok=True)
    shutil.rmtree(workdir / name, ignore_errors=True)
    return {
        "config": name, "overrides": overrides, "steps": report.steps, "train_tokens": report.train_tokens,
        "tokens_per_s": report.tokens_per_s, "train_seconds": round(trained, 1), "stopped_by": report.stopped_by,
        "best_val_loss": report.best_eval_loss, **golden_scores.overall, "ci": golden_scores.ci,
        "parts": golden_scores.parts, "quality": quality_score(golden_scores.overall),
        "forgetting": (scores.forgetting or {}).get("score"),
        "forgetting_rows": (scores.forgetting or {}).get("rows"), "curve": report.curve,
        "device_note": report.device_note,
        "answers": [{k: r[k] for k in ("family", "part", "answer", "problems", "number_correctness",
                                       "label_correctness", "exact_match")} for r in golden_scores.rows],
    }


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Measured {result['date']} on {m['cpu']} ({', '.join(m.get('cpu_features', []))}), "
             f"{m['cores_usable']} cores, nothing else running; budget {result['minutes']} min per configuration; "
             f"golden set of {result['golden_samples']} questions (hash {result['golden_hash']}); "
             f"`python -m benchmarks.sweep_training {result['argv']}`.", "",
             "| config | overrides | steps | tokens | tokens/s | val loss | numbers | labels | exact | format | "
             "labels (held-out wording) | forgetting |", "|" + "---|" * 12]
    def fmt(r: dict, k: str) -> str:
        ci = r.get("ci") or {}
        if r.get(k) is None:
            return "–"
        return f"{r[k]:.3f}" + (f" [{ci[k][0]:.2f}, {ci[k][1]:.2f}]" if ci.get(k) else "")

    for r in result["rows"]:
        held = (r.get("parts") or {}).get("paraphrase", {}).get("label_correctness")
        lines.append(f"| {r['config']} | {json.dumps(r['overrides'])} | {r['steps']} | {r['train_tokens']:,} | "
                     f"{r['tokens_per_s']} | {r['best_val_loss']} | {fmt(r, 'number_correctness')} | "
                     f"{fmt(r, 'label_correctness')} | {fmt(r, 'exact_match')} | {fmt(r, 'format_validity')} | "
                     f"{held if held is not None else '–'} | {r['forgetting']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import datetime as dt

    from finpipe import paths
    from finpipe.evaluation.golden import golden_hash
    from finpipe.instructions.samples import read_jsonl
    from finpipe.models import registry
    from finpipe.training.spec import AdapterSpec

    args = parse_args(argv)
    lake_dir = paths.lake_dir()
    files = paths.DatasetFiles.of(lake_dir)
    golden_file = files.golden
    if not golden_file.exists():
        raise SystemExit(f"no golden set at {golden_file}: run `finpipe run` first")
    train, val, golden = read_jsonl(files.train), read_jsonl(files.val), read_jsonl(golden_file)
    base = registry.read_pointer(registry.base_pointer(lake_dir))
    common = dict(_typed(AdapterSpec, a) for a in args.set)
    if args.minutes is not None:
        common["max_minutes"] = args.minutes
    result: dict[str, Any] = {"machine": _common.machine(), "date": dt.date.today().isoformat(),
                              "minutes": common.get("max_minutes", AdapterSpec.max_minutes), "common": common,
                              "golden_samples": len(golden), "golden_hash": golden_hash(golden),
                              "argv": " ".join(argv or []), "rows": []}
    with tempfile.TemporaryDirectory(prefix="finpipe-sweep-") as tmp:
        for name in args.configs:
            print(f"sweep: {name} {CONFIGS[name]}", flush=True)
            row = run_config(name, common | CONFIGS[name], golden, val, train, base, Path(tmp),
                             Path(args.keep) if args.keep else None)
            result["rows"].append(row)
            print(f"sweep: {name}: numbers {row['number_correctness']}, labels {row['label_correctness']}, "
                  f"exact {row['exact_match']}, {row['steps']} steps", flush=True)
            runtime.release_memory()
    table = markdown(result)
    if args.markdown:
        Path(args.markdown).write_text(table)
    columns = ["config", "steps", "train_tokens", "tokens_per_s", "best_val_loss", "number_correctness",
               "label_correctness", "exact_match", "format_validity", "forgetting"]
    return _common.finish(NAME, result, args.json, _common.format_table(result["rows"], columns))


if __name__ == "__main__":
    main()
