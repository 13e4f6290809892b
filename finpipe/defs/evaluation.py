"""Evaluation, report and promotion assets: score the newest adapter against its base (and the champion)
on held-out data, write the report, and promote only a winner."""

import dataclasses
import datetime as dt
import json
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field

from finpipe.defs.datasets import golden_path, split_and_golden, split_dir
from finpipe.defs.metadata import markdown_table, markdown_with_inline_images
from finpipe.defs.models import qlora_adapter
from finpipe.defs.resources import LAKE_WRITER_POOL, LAKE_WRITER_TAGS, LakeResource
from finpipe.evaluation.evaluate import EvalSpec
from finpipe.evaluation.promotion import decide, golden_regressions
from finpipe.models import registry


class EvaluationConfig(dg.Config):
    """The UI/run-config face of ``EvalSpec`` (same fields, same defaults)."""

    val_answers_per_family: int = Field(default=EvalSpec.val_answers_per_family,
                                        description="greedy answers generated per family on the validation split")
    golden_per_family: int = Field(default=EvalSpec.golden_per_family,
                                   description="golden set size per family (used once, when the set is frozen)")
    loss_samples: int = Field(default=EvalSpec.loss_samples, description="validation samples for the loss")
    max_new_tokens: int = EvalSpec.max_new_tokens
    regression_tolerance: float = Field(default=EvalSpec.regression_tolerance,
                                        description="allowed drop vs the champion on golden answer metrics")
    seed: int = EvalSpec.seed


def evaluation_dir(adapter_path: str | Path) -> Path:
    return Path(adapter_path) / "evaluation"


def read_evaluation(lake: LakeResource) -> dict:
    latest = registry.read_pointer(registry.latest_adapter_pointer(lake.directory))
    path = evaluation_dir(latest["path"]) / "evaluation.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: materialize adapter_evaluation for run {latest['run_id']} first")
    return json.loads(path.read_text())


def _window(samples) -> tuple[str | None, str | None]:
    dates = [s.as_of for s in samples if s.as_of]
    return (min(dates), max(dates)) if dates else (None, None)


@dg.asset(
    deps=[qlora_adapter],
    group_name="evaluation",
    pool=LAKE_WRITER_POOL,  # records its row in model_runs
    op_tags=LAKE_WRITER_TAGS,
    kinds={"pytorch"},
    description="The newest adapter vs its base model (and the current champion, on the golden set): loss, "
    "perplexity, numeric fidelity, label accuracy, token F1, ROUGE-L, format validity, latency. Writes "
    "evaluation.json into the adapter's folder and a row into the model_runs registry.",
)
def adapter_evaluation(context: dg.AssetExecutionContext, config: EvaluationConfig,
                       lake: LakeResource) -> dg.MaterializeResult:
    from finpipe.evaluation.evaluate import evaluate_base_and_adapter, evaluate_champion
    from finpipe.evaluation.golden import golden_hash
    from finpipe.models.files import atomic_write_text

    spec = EvalSpec(**config.model_dump())
    latest = registry.read_pointer(registry.latest_adapter_pointer(lake.directory))
    train, val, golden, created = split_and_golden(lake, spec.golden_per_family, spec.seed)
    if created:
        context.log.info(f"froze the golden set: {len(golden)} samples at {golden_path(lake)}")
    base, adapter = evaluate_base_and_adapter(latest["base"]["path"], latest["path"], val, golden, spec,
                                              log=context.log.info)
    champion_pointer = registry.champion_pointer(lake.directory)
    champion_ref = registry.read_pointer(champion_pointer) if champion_pointer.exists() else None
    champion = None
    if champion_ref and champion_ref["run_id"] != latest["run_id"]:
        champion = evaluate_champion(champion_ref["base"]["path"], champion_ref["path"], golden, spec,
                                     log=context.log.info)
    variants = {"base": base.as_dict(), "adapter": adapter.as_dict(), "champion": champion.as_dict() if champion else None}
    answers = {"base": base.val.rows, "adapter": adapter.val.rows}
    result = {
        "run_id": latest["run_id"], "adapter_path": latest["path"], "base": latest["base"],
        "champion": champion_ref, "same_base_as_champion": bool(champion_ref) and
        champion_ref["base"]["path"] == latest["base"]["path"],
        "golden_hash": golden_hash(golden), "golden_samples": len(golden), "spec": dataclasses.asdict(spec),
        "variants": variants, "answers": answers,
        "golden_answers": {"base": base.golden.rows, "adapter": adapter.golden.rows,
                           **({"champion": champion.golden.rows} if champion else {})},
        "evaluated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    out = evaluation_dir(latest["path"]) / "evaluation.json"
    atomic_write_text(out, json.dumps(result, indent=1))

    report = json.loads((Path(latest["path"]) / "training_report.json").read_text())
    train_first, train_last = _window(train)
    registry.RunRegistry(lake.prices_lake()).record({
        "run_id": latest["run_id"], "created_at": dt.datetime.now(dt.timezone.utc).replace(tzinfo=None),
        "base_model": latest["base"]["name"], "quantization": report["quantization"],
        "train_first": train_first, "train_last": train_last,
        "val_cutoff": json.loads((split_dir(lake) / "split.json").read_text())["cutoff"],
        "config_hash": latest.get("fingerprint", ""), "adapter_path": latest["path"],
        "golden_hash": result["golden_hash"], "val_loss": adapter.val.loss, "base_val_loss": base.val.loss,
        "golden_loss": adapter.golden.loss,
        "golden_numeric_fidelity": adapter.golden.overall["numeric_fidelity"],
        "golden_label_accuracy": adapter.golden.overall["label_accuracy"],
        "golden_rouge_l": adapter.golden.overall["rouge_l"],
        "metrics_json": {"adapter": variants["adapter"], "base": variants["base"]}, "status": "evaluated",
    })
    from finpipe.evaluation.report import metrics_rows

    table = pl.DataFrame(metrics_rows(variants))
    return dg.MaterializeResult(metadata={
        "run_id": latest["run_id"],
        "path": dg.MetadataValue.path(str(out)),
        "base_val_loss": base.val.loss,
        "adapter_val_loss": adapter.val.loss,
        "base_numeric_fidelity": base.val.overall["numeric_fidelity"],
        "adapter_numeric_fidelity": adapter.val.overall["numeric_fidelity"],
        "golden_hash": result["golden_hash"],
        "golden_set_created": created,
        "champion": champion_ref["run_id"] if champion_ref else "",
        "metrics": dg.MetadataValue.md(markdown_table(table, max_rows=40)),
    })


@dg.asset_check(asset=adapter_evaluation, description="The adapter has a lower validation loss than its base model.")
def adapter_beats_base_on_val_loss(lake: LakeResource) -> dg.AssetCheckResult:
    v = read_evaluation(lake)["variants"]
    return dg.AssetCheckResult(passed=v["adapter"]["val"]["loss"] < v["base"]["val"]["loss"],
                               metadata={"adapter": v["adapter"]["val"]["loss"], "base": v["base"]["val"]["loss"]})


@dg.asset_check(asset=adapter_evaluation,
                description="No golden-set answer metric drops more than the tolerance below the champion's.")
def no_golden_regression_vs_champion(lake: LakeResource) -> dg.AssetCheckResult:
    evaluation = read_evaluation(lake)
    v = evaluation["variants"]
    if v["champion"] is None:
        return dg.AssetCheckResult(passed=True, metadata={"champion": "none yet (or this run is the champion)"})
    found = golden_regressions(v["adapter"], v["champion"], evaluation["spec"]["regression_tolerance"])
    return dg.AssetCheckResult(passed=not found, severity=dg.AssetCheckSeverity.WARN,
                               metadata={"regressions": dg.MetadataValue.json(found),
                                         "champion": evaluation["champion"]["run_id"]})


def _decision(evaluation: dict):
    v = evaluation["variants"]
    return decide(v["adapter"], v["base"], v["champion"], evaluation["spec"]["regression_tolerance"],
                  same_base=evaluation["same_base_as_champion"])


@dg.asset(
    deps=[adapter_evaluation],
    group_name="evaluation",
    kinds={"html"},
    description="A self-contained HTML report (and Markdown) in the adapter's evaluation folder: metrics "
    "table base vs adapter vs champion, loss curves, per-family bars, sample answers side by side.",
)
def evaluation_report(lake: LakeResource) -> dg.MaterializeResult:
    from finpipe.evaluation.report import family_bars_png, render

    evaluation = read_evaluation(lake)
    out = evaluation_dir(evaluation["adapter_path"])
    decision = _decision(evaluation)
    variants = dict(evaluation["variants"])
    bars = family_bars_png(variants, out / "per_family.png")
    images = {"Per-family answer quality (validation)": bars}
    loss_png = Path(evaluation["adapter_path"]) / "loss.png"
    if loss_png.exists():
        images = {"Adapter loss curves": loss_png} | images
    summary = [("run", evaluation["run_id"]), ("base model", evaluation["base"]["name"]),
               ("champion before this run", evaluation["champion"]["run_id"] if evaluation["champion"] else "none"),
               ("golden set", f"{evaluation['golden_samples']} samples, hash {evaluation['golden_hash']}"),
               ("promotion decision", ("promote: " if decision.promote else "keep the champion: ") + decision.reason),
               ("evaluated at", evaluation["evaluated_at"])]
    md_path, html_path = render(f"finpipe evaluation — {evaluation['run_id']}", summary, variants,
                                evaluation["answers"], images, out)
    ui_markdown = markdown_with_inline_images(md_path.read_text(), images)
    return dg.MaterializeResult(metadata={
        "html": dg.MetadataValue.path(str(html_path)),
        "markdown": dg.MetadataValue.path(str(md_path)),
        "report": dg.MetadataValue.md(ui_markdown),
        "promote": decision.promote,
    })


@dg.asset(
    deps=[adapter_evaluation],
    group_name="evaluation",
    pool=LAKE_WRITER_POOL,
    op_tags=LAKE_WRITER_TAGS,
    kinds={"duckdb"},
    description="Promotion: the newest adapter becomes the champion (models/adapters/champion.json, "
    "model_runs.status) only if it beats the base model and the current champion without regressing.",
)
def champion_adapter(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    evaluation = read_evaluation(lake)
    runs = registry.RunRegistry(lake.prices_lake())
    decision = _decision(evaluation)
    previous = evaluation["champion"]
    pointer = registry.champion_pointer(lake.directory)
    if decision.promote:
        payload = {"run_id": evaluation["run_id"], "path": evaluation["adapter_path"], "base": evaluation["base"],
                   "promoted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   "previous": previous["run_id"] if previous else None, "reason": decision.reason}
        runs.promote(evaluation["run_id"], pointer, payload, decision.reason)
        context.log.info(f"promoted {evaluation['run_id']}: {decision.reason}")
    else:
        runs.reject(evaluation["run_id"], decision.reason)
        context.log.warning(f"kept the champion ({previous['run_id'] if previous else 'none'}): {decision.reason}")
    champion = registry.read_pointer(pointer) if pointer.exists() else None
    history = runs.runs().select("run_id", "status", "val_loss", "golden_loss", "golden_numeric_fidelity",
                                 "golden_label_accuracy", "reason").head(10)
    return dg.MaterializeResult(metadata={
        "promoted": decision.promote,
        "reason": decision.reason,
        "challenger": evaluation["run_id"],
        "previous_champion": previous["run_id"] if previous else "",
        "champion": champion["run_id"] if champion else "",
        "champion_path": dg.MetadataValue.path(champion["path"]) if champion else "",
        "regressions": dg.MetadataValue.json(decision.regressions),
        "registry": dg.MetadataValue.md(markdown_table(history)),
    })


evaluation_assets = [adapter_evaluation, evaluation_report, champion_adapter]
evaluation_checks = [adapter_beats_base_on_val_loss, no_golden_regression_vs_champion]
