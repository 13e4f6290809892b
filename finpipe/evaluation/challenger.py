"""Evaluate a freshly trained adapter (the challenger) against its base model and the current champion, on the
validation split and the frozen golden set, and build its registry row.

Scores that cannot have changed are reused instead of regenerated: the base model's golden-set and forgetting
scores (same base weights, same golden set, same scorer) are cached in the lake, and the champion's come from
its own evaluation, when it was the challenger on the same golden set with the same evaluation settings.
Validation scores are always fresh: the validation split grows every night.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

from finpipe.evaluation.evaluate import EvalSpec, quality_score
from finpipe.evaluation.golden import golden_hash
from finpipe.instructions.samples import Sample
from finpipe.models.files import atomic_write_text

EVALUATION_FILE = "evaluation.json"


def evaluation_dir(adapter_path: str | Path) -> Path:
    return Path(adapter_path) / "evaluation"


def _base_cache_path(cache_dir: Path, base_dir: str, golden: Sequence[Sample], spec: EvalSpec) -> Path:
    from finpipe.runtime import accelerator, inference_dtype

    weights = sorted(Path(base_dir).glob("*.safetensors"))
    stamp = [str(Path(base_dir).resolve()), golden_hash(golden), spec.cache_key(), str(inference_dtype(accelerator()))]
    stamp += [f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights]
    return cache_dir / f"base-{hashlib.sha256('|'.join(stamp).encode()).hexdigest()[:16]}.json"


def _reusable_champion_scores(champion: dict | None, golden: Sequence[Sample], spec: EvalSpec,
                              end_to_end=None) -> dict | None:
    """The champion's golden and forgetting scores from its own evaluation, if made on this golden set with these
    settings (and, with ``end_to_end``, on the same end-to-end questions)."""
    if not champion:
        return None
    path = evaluation_dir(champion["path"]) / EVALUATION_FILE
    try:
        own = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if own.get("golden_hash") != golden_hash(golden) or own.get("cache_key") != spec.cache_key():
        return None
    scores = own["variants"]["adapter"]
    rows = own.get("golden_answers", {}).get("adapter")  # the record keeps the answers once, beside the scores
    if rows is None:
        return None
    e2e = None
    if end_to_end is not None:
        e2e_rows = (own.get("end_to_end_answers") or {}).get("adapter")
        if e2e_rows is None or (scores.get("end_to_end") or {}).get("digest") != end_to_end.digest:
            return None
        e2e = scores["end_to_end"] | {"rows": e2e_rows}
    return {"name": "champion", "val": None, "golden": scores["golden"] | {"rows": rows},
            "forgetting": scores.get("forgetting"), "end_to_end": e2e}


def evaluate_challenger(latest: dict, champion: dict | None, val: Sequence[Sample], golden: Sequence[Sample],
                        spec: EvalSpec, cache_dir: Path, log: Callable[[str], None] = print, end_to_end=None) -> dict:
    """Score base, challenger (and champion, unless it is the challenger) and return the evaluation record
    (what ``evaluation.json`` holds); rows of every generated answer included. ``end_to_end``: an
    ``finpipe.evaluation.end_to_end.EndToEndSet`` the challenger and the champion also answer through the
    answering path (the base model is not asked: it answers the ideal context poorly already)."""
    from finpipe.evaluation.evaluate import evaluate_model

    base_dir = latest["base"]["path"]
    cache = _base_cache_path(cache_dir, base_dir, golden, spec)
    cached = json.loads(cache.read_text()) if cache.exists() else None
    if cached:
        log(f"base model: golden-set and forgetting scores from the cache ({cache.name})")
        base_val = evaluate_model("base", base_dir, None, val, [], spec, log, with_golden=False, with_forgetting=False)
        base = cached | {"val": base_val.as_dict()["val"]}
    else:
        base = evaluate_model("base", base_dir, None, val, golden, spec, log).as_dict()
        atomic_write_text(cache, json.dumps(base | {"val": None}))
    adapter = evaluate_model("adapter", base_dir, latest["path"], val, golden, spec, log,
                             end_to_end=end_to_end).as_dict()

    champion_scores = None
    if champion and champion["run_id"] != latest["run_id"]:
        champion_scores = _reusable_champion_scores(champion, golden, spec, end_to_end)
        if champion_scores:
            log(f"champion {champion['run_id']}: golden-set scores from its own evaluation")
        else:
            champion_scores = evaluate_model("champion", champion["base"]["path"], champion["path"], [], golden, spec,
                                             log, with_val=False, end_to_end=end_to_end).as_dict()
    variants = {"base": base, "adapter": adapter, "champion": champion_scores}
    golden_rows = {k: v["golden"]["rows"] for k, v in variants.items() if v}
    e2e_rows = {k: v["end_to_end"]["rows"] for k, v in variants.items() if v and v.get("end_to_end")}
    return {
        "run_id": latest["run_id"], "adapter_path": latest["path"], "base": latest["base"],
        "champion": champion, "same_base_as_champion": bool(champion) and champion["base"]["path"] == base_dir,
        "golden_hash": golden_hash(golden), "golden_samples": len(golden), "spec": dataclasses.asdict(spec),
        "cache_key": spec.cache_key(),
        "variants": {k: _without_rows(v) for k, v in variants.items()},
        "answers": {k: v["val"]["rows"] for k, v in variants.items() if v and v.get("val")},
        "golden_answers": golden_rows,
        "end_to_end_answers": e2e_rows,
        "differences": paired_differences(golden_rows, spec.seed),
        "evaluated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def paired_differences(golden_rows: dict[str, list[dict]], seed: int = 0) -> dict[str, dict[str, list[float] | None]]:
    """Adapter minus base and adapter minus champion on each headline metric, paired over the golden samples both
    answered: [mean difference, 95% interval low, high]. A difference whose interval spans 0 is not established."""
    from finpipe.evaluation.evaluate import HEADLINE_METRICS
    from finpipe.evaluation.stats import paired_difference_ci

    out: dict[str, dict[str, list[float] | None]] = {}
    adapter = {r["id"]: r for r in golden_rows.get("adapter", [])}
    for other in ("base", "champion"):
        if other not in golden_rows:
            continue
        theirs = {r["id"]: r for r in golden_rows[other]}
        shared = [i for i in adapter if i in theirs]
        out[f"adapter - {other}"] = {
            metric: (list(d) if (d := paired_difference_ci([adapter[i].get(metric) for i in shared],
                                                           [theirs[i].get(metric) for i in shared], seed)) else None)
            for metric in HEADLINE_METRICS}
    return out


def _without_rows(scores: dict | None) -> dict | None:
    """The scores without the per-answer rows, which the record keeps once, under ``answers`` and
    ``golden_answers`` (the forgetting probe keeps its few rows: promotion's paired interval reads them)."""
    if scores is None:
        return None
    out = dict(scores)
    for part in ("val", "golden", "end_to_end"):
        if out.get(part):
            out[part] = {k: v for k, v in out[part].items() if k != "rows"}
    return out


def write_evaluation(evaluation: dict) -> Path:
    out = evaluation_dir(evaluation["adapter_path"]) / EVALUATION_FILE
    atomic_write_text(out, json.dumps(evaluation, indent=1))
    return out


def registry_row(evaluation: dict, training_report: dict, train_window: tuple[str | None, str | None],
                 val_cutoff: str | None, fingerprint: str, mlflow_run_id: str | None = None,
                 trigger: str | None = None, trigger_reason: str | None = None, inputs: dict | None = None) -> dict:
    """The ``model_runs`` row of an evaluated adapter (``mlflow_run_id``: its MLflow run, when tracking was on;
    ``trigger`` / ``trigger_reason``: what started the run, e.g. ``drift`` and the drift sensor's reason; ``inputs``:
    what reproducing it needs, ``finpipe.reproduce.recorded_inputs``)."""
    adapter, base = evaluation["variants"]["adapter"], evaluation["variants"]["base"]
    golden = adapter["golden"]["overall"]
    return {
        "run_id": evaluation["run_id"], "created_at": dt.datetime.now(dt.timezone.utc).replace(tzinfo=None),
        "base_model": evaluation["base"]["name"], "quantization": training_report["quantization"],
        "train_first": train_window[0], "train_last": train_window[1], "val_cutoff": val_cutoff,
        "config_hash": fingerprint, "adapter_path": evaluation["adapter_path"],
        "golden_hash": evaluation["golden_hash"], "val_loss": adapter["val"]["loss"], "base_val_loss": base["val"]["loss"],
        "golden_loss": adapter["golden"]["loss"],
        "golden_number_correctness": golden.get("number_correctness"),
        "golden_label_correctness": golden.get("label_correctness"),
        "golden_exact_match": golden.get("exact_match"),
        "golden_quality": quality_score(golden),
        "forgetting_probe": (adapter.get("forgetting") or {}).get("score"),
        "train_tokens": training_report.get("cumulative_train_tokens") or training_report.get("train_tokens"),
        "train_processes": training_report.get("processes", 1),
        "metrics_json": {"adapter": adapter, "base": base}, "status": "evaluated", "mlflow_run_id": mlflow_run_id,
        "run_trigger": trigger, "trigger_reason": trigger_reason,
        **(inputs or {}),
    }
