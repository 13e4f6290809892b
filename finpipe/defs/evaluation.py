"""Evaluation, report and promotion assets: score the newest adapter against its base (and the champion)
on held-out data, write the report, and promote only a winner."""

import datetime as dt
import json
from pathlib import Path

import dagster as dg
import polars as pl

from finpipe.defs.config import config_class
from finpipe.defs.datasets import dataset_files, split_and_golden
from finpipe.defs.metadata import markdown_table, tracking_metadata
from finpipe.defs.models import qlora_adapter
from finpipe.defs.resources import LAKE_WRITER_POOL, LAKE_WRITER_TAGS, LakeResource, TrackingResource
from finpipe.evaluation.challenger import EVALUATION_FILE, evaluation_dir
from finpipe.evaluation.evaluate import HEADLINE_METRICS, EvalSpec
from finpipe.evaluation.promotion import decide, golden_regressions
from finpipe.models import registry

EvaluationConfig = config_class(EvalSpec, "EvaluationConfig")


def read_evaluation(lake: LakeResource) -> dict:
    latest = registry.read_pointer(registry.latest_adapter_pointer(lake.directory))
    path = evaluation_dir(latest["path"]) / EVALUATION_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: materialize adapter_evaluation for run {latest['run_id']} first")
    return json.loads(path.read_text())


def _e2e_means(scores: dict) -> dict[str, dict]:
    """Part -> metric means of a variant's end-to-end evaluation ({} when it had none)."""
    parts = ((scores.get("end_to_end") or {}).get("summary") or {}).get("parts") or {}
    return {part: got["means"] for part, got in parts.items()}


def _window(samples) -> tuple[str | None, str | None]:
    dates = [s.as_of for s in samples if s.as_of]
    return (min(dates), max(dates)) if dates else (None, None)


@dg.asset(
    deps=[qlora_adapter],
    group_name="evaluation",
    pool=LAKE_WRITER_POOL,  # records its row in model_runs
    op_tags=LAKE_WRITER_TAGS,
    kinds={"pytorch"},
    description="The newest adapter vs its base model (and the current champion) on the frozen golden set and the "
    "validation split: strict number and label correctness, exact match (with bootstrap 95% intervals), format "
    "validity, loss, the forgetting probe, latency. Writes evaluation.json into the adapter's folder and a row "
    "into the model_runs registry.",
)
def adapter_evaluation(context: dg.AssetExecutionContext, config: EvaluationConfig,
                       lake: LakeResource, tracking: TrackingResource) -> dg.MaterializeResult:
    from finpipe.evaluation.challenger import evaluate_challenger, registry_row, write_evaluation

    spec = EvalSpec(**config.model_dump())
    latest = registry.read_pointer(registry.latest_adapter_pointer(lake.directory))
    train, val, golden, created = split_and_golden(lake, spec.golden_per_family, spec.seed,
                                                   spec.golden_paraphrase_share)
    if created:
        context.log.info(f"froze the golden set: {len(golden)} samples at {dataset_files(lake).golden}")
    champion_pointer = registry.champion_pointer(lake.directory)
    champion = registry.read_pointer(champion_pointer) if champion_pointer.exists() else None
    from finpipe.evaluation.end_to_end import build_set

    end_to_end = build_set(golden, lake.prices_lake(), spec.seed)
    evaluation = evaluate_challenger(latest, champion, val, golden, spec,
                                     registry.models_dir(lake.directory) / "evaluation_cache", log=context.log.info,
                                     end_to_end=end_to_end)
    out = write_evaluation(evaluation)
    report = json.loads((Path(latest["path"]) / "training_report.json").read_text())
    cutoff = json.loads(dataset_files(lake).split_manifest.read_text())["cutoff"]
    tracked = {}
    if tracking.enabled:
        from finpipe.tracking import log_evaluation

        outcome = log_evaluation(tracking.spec(), lake.directory, Path(latest["path"]), evaluation, out,
                                 warn=context.log.warning)
        tracked = _said(context, outcome)
    from finpipe.defs.automation import DRIFT_REASON_TAG, TRIGGER_TAG
    from finpipe.reproduce import recorded_inputs

    trigger, trigger_reason = context.run.tags.get(TRIGGER_TAG, "manual"), context.run.tags.get(DRIFT_REASON_TAG)
    registry.RunRegistry(lake.prices_lake()).record(
        registry_row(evaluation, report, _window(train), cutoff, latest.get("fingerprint", ""),
                     mlflow_run_id=tracked.get("mlflow_run_id"), trigger=trigger, trigger_reason=trigger_reason,
                     inputs=recorded_inputs(lake.directory, report, latest["base"]["path"], latest["path"], train, val)))
    from finpipe.evaluation.report import metrics_rows

    variants = evaluation["variants"]
    golden_scores = lambda name: (variants.get(name) or {}).get("golden") or {}  # noqa: E731
    return dg.MaterializeResult(metadata={
        "run_id": latest["run_id"],
        "trigger": trigger,
        **({"trigger_reason": trigger_reason} if trigger_reason else {}),
        "path": dg.MetadataValue.path(str(out)),
        "base_val_loss": variants["base"]["val"]["loss"],
        "adapter_val_loss": variants["adapter"]["val"]["loss"],
        **{f"{name}_{metric}": golden_scores(name).get("overall", {}).get(metric)
           for name in ("base", "adapter") for metric in HEADLINE_METRICS},
        **{f"adapter_end_to_end_{part}_{metric}": means.get(metric)
           for part, means in _e2e_means(variants["adapter"]).items()
           for metric in ("number_correctness", "label_correctness", "relevance", "refusal_correctness")
           if metric in means},
        "adapter_forgetting_probe": (variants["adapter"].get("forgetting") or {}).get("score"),
        "base_forgetting_probe": (variants["base"].get("forgetting") or {}).get("score"),
        "golden_hash": evaluation["golden_hash"],
        "golden_set_created": created,
        "champion": champion["run_id"] if champion else "",
        "metrics": dg.MetadataValue.md(markdown_table(pl.DataFrame(metrics_rows(variants)), max_rows=60)),
        **tracked,
    })


def _said(context: dg.AssetExecutionContext, outcome) -> dict:
    """A step's MLflow outcome as its metadata. An adapter without an MLflow run was said once already, by its
    training step (or tracking was off then): here it is one info line, and the metadata records what is missing."""
    if outcome.run_id is None and outcome.missing:
        context.log.info(f"MLflow: not logged: {', '.join(outcome.missing)} ({outcome.error})")
    return tracking_metadata(outcome.summary())


@dg.asset_check(asset=adapter_evaluation, description="The adapter has a lower validation loss than its base model.")
def adapter_beats_base_on_val_loss(lake: LakeResource) -> dg.AssetCheckResult:
    v = read_evaluation(lake)["variants"]
    return dg.AssetCheckResult(passed=v["adapter"]["val"]["loss"] < v["base"]["val"]["loss"],
                               metadata={"adapter": v["adapter"]["val"]["loss"], "base": v["base"]["val"]["loss"]})


@dg.asset_check(asset=adapter_evaluation,
                description="No strict golden-set metric drops more than the tolerance below the champion's.")
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
                  same_base=evaluation["same_base_as_champion"],
                  forgetting_tolerance=evaluation["spec"]["forgetting_tolerance"])


# Not blocking: a challenger that forgets is a normal outcome of a nightly run, not a failed run. Promotion applies
# the same rule (finpipe.evaluation.promotion.decide) and keeps the champion; the report still shows why.
@dg.asset_check(asset=adapter_evaluation,
                description="The adapter has not clearly forgotten general skills: on the forgetting probe it is not "
                "significantly and materially below the base model (promotion refuses it otherwise).")
def adapter_keeps_general_skills(lake: LakeResource) -> dg.AssetCheckResult:
    from finpipe.evaluation.promotion import forgetting_check

    evaluation = read_evaluation(lake)
    v = evaluation["variants"]
    found = forgetting_check(v["adapter"], v["base"], evaluation["spec"]["forgetting_tolerance"])
    return dg.AssetCheckResult(passed=not (found and found["forgot"]), severity=dg.AssetCheckSeverity.WARN,
                               metadata={"probe": dg.MetadataValue.json(found)})


@dg.asset(
    deps=[adapter_evaluation],
    group_name="evaluation",
    kinds={"html"},
    description="A self-contained HTML report (and Markdown) in the adapter's evaluation folder: strict golden "
    "metrics with intervals (base vs adapter vs champion), training vs held-out wording, paired differences, the "
    "forgetting probe, the learning curve, loss curves, per-family bars, sample answers with what was wrong.",
)
def evaluation_report(context: dg.AssetExecutionContext, lake: LakeResource,
                      tracking: TrackingResource) -> dg.MaterializeResult:
    from finpipe.evaluation.report import render_evaluation, summary_markdown

    evaluation = read_evaluation(lake)
    out = evaluation_dir(evaluation["adapter_path"])
    decision = _decision(evaluation)
    training = json.loads((Path(evaluation["adapter_path"]) / "training_report.json").read_text())
    md_path, html_path, images = render_evaluation(evaluation, training, decision, out)
    ui_markdown = summary_markdown(md_path.read_text(), html_path)
    tracked = {}
    if tracking.enabled:
        from finpipe.tracking import log_report

        outcome = log_report(tracking.spec(), lake.directory, Path(evaluation["adapter_path"]),
                             [html_path, md_path, *images.values()], warn=context.log.warning)
        tracked = _said(context, outcome)
    return dg.MaterializeResult(metadata={
        "html": dg.MetadataValue.path(str(html_path)),
        "markdown": dg.MetadataValue.path(str(md_path)),
        "report": dg.MetadataValue.md(ui_markdown),
        "promote": decision.promote,
        **tracked,
    })


def _merge_for_answers(context: dg.AssetExecutionContext, lake: LakeResource, champion: dict):
    """The new champion merged into its base once, now, so the first `finpipe ask` loads it directly. A failure
    here costs only that: `ask` merges on first use instead, and the promotion stands."""
    from pathlib import Path

    from finpipe.models import merged
    from finpipe.runtime import accelerator, inference_dtype, release_memory

    base, adapter = Path(champion["base"]["path"]), Path(champion["path"])
    try:
        folder = merged.cached_any(lake.directory, adapter.name, base, adapter)
        if folder is None:
            dtype = str(inference_dtype(accelerator())).removeprefix("torch.")
            folder = merged.build(lake.directory, adapter.name, base, adapter, dtype, log=context.log.info)
        return folder
    except (OSError, ValueError, RuntimeError) as exc:
        context.log.warning(f"could not merge the champion for answering ({exc}): `finpipe ask` merges it on first use")
        return None
    finally:
        release_memory()


@dg.asset(
    deps=[adapter_evaluation],
    group_name="evaluation",
    pool=LAKE_WRITER_POOL,
    op_tags=LAKE_WRITER_TAGS,
    kinds={"duckdb"},
    description="Promotion: the newest adapter becomes the champion (models/adapters/champion.json, "
    "model_runs.status) only if it beats the base model, keeps its general skills (forgetting probe), and improves "
    "on the current champion's strict golden quality without regressing on any strict metric. A new champion is "
    "merged into its base once (models/merged/<run id>), so `finpipe ask` loads it without merging.",
)
def champion_adapter(context: dg.AssetExecutionContext, lake: LakeResource,
                     tracking: TrackingResource) -> dg.MaterializeResult:
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
        merged_folder = _merge_for_answers(context, lake, payload)
    else:
        merged_folder = None
        runs.reject(evaluation["run_id"], decision.reason)
        context.log.warning(f"kept the champion ({previous['run_id'] if previous else 'none'}): {decision.reason}")
    tracked = _track_promotion(context, tracking, lake, evaluation, decision) if tracking.enabled else {}
    champion = registry.read_pointer(pointer) if pointer.exists() else None
    history = runs.runs().select("run_id", "status", "val_loss", "golden_number_correctness",
                                 "golden_label_correctness", "golden_exact_match", "forgetting_probe", "reason").head(10)
    return dg.MaterializeResult(metadata={
        "promoted": decision.promote,
        "reason": decision.reason,
        "challenger": evaluation["run_id"],
        "previous_champion": previous["run_id"] if previous else "",
        "champion": champion["run_id"] if champion else "",
        "champion_path": dg.MetadataValue.path(champion["path"]) if champion else "",
        "merged_weights": dg.MetadataValue.path(str(merged_folder)) if merged_folder else "",
        "regressions": dg.MetadataValue.json(decision.regressions),
        "registry": dg.MetadataValue.md(markdown_table(history)),
        **tracked,
    })


def _track_promotion(context: dg.AssetExecutionContext, tracking: TrackingResource, lake: LakeResource,
                     evaluation: dict, decision) -> dict:
    """In the step that replaced champion.json (or kept it): the adapter's model card, and the @champion alias on its
    model version when it was promoted (a refused one's version is tagged rejected; the alias stays)."""
    from finpipe.inference.lineage import adapter_lineage
    from finpipe.inference.model_card import adapter_card
    from finpipe.models.files import atomic_write_text
    from finpipe.tracking import log_promotion

    adapter = {"run_id": evaluation["run_id"], "path": evaluation["adapter_path"], "base": evaluation["base"]}
    card = evaluation_dir(evaluation["adapter_path"]) / "model_card.md"
    try:  # tracking's own work: it never fails the promotion that already happened
        atomic_write_text(card, adapter_card(adapter_lineage(lake.directory, adapter)))
    except Exception as exc:
        context.log.warning(f"model card not written ({type(exc).__name__}: {exc}): MLflow gets none")
        card = None
    outcome = log_promotion(tracking.spec(), lake.directory, Path(evaluation["adapter_path"]), decision.promote,
                            decision.reason, card, warn=context.log.warning)
    return _said(context, outcome) | ({"model_card": dg.MetadataValue.path(str(card))} if card else {})
