"""Nightly retraining and refresh-on-new-data.

- ``nightly_retrain`` (job): the day's price partition, statistics, datasets, base model, adapter (warm-started
  from the champion), evaluation, report and promotion, in one run.
- ``nightly_schedule``: weekdays after the close, timezone-aware. Default 18:30 America/New_York (US close
  16:00 + data settling); override with ``FINPIPE_NIGHTLY_CRON`` / ``FINPIPE_NIGHTLY_TIMEZONE`` (e.g.
  ``0 18 * * 1-5`` / ``Asia/Kolkata`` for the India universe, close 15:30 IST). Off until switched on in the UI.
- ``refresh_on_new_prices``: an automation-condition sensor; statistics and datasets are ``eager``, so any new
  price partition (a manual backfill, a late day) refreshes them without retraining.
- ``retrain_on_drift``: a sensor; when the latest statistics have drifted from the champion's training window
  (return, volatility and RSI distributions, the volatility regime, tickers it never saw:
  ``finpipe.statistics.drift``) it requests a ``nightly_retrain`` run of the latest session, the reason in its tags.
  Off until switched on in the UI, like the schedule.
- ``snapshot_lake_after_success``: a run-status sensor; after every successful run of this code location (launched
  from the UI, the schedule or a sensor) it keeps a snapshot of the lake file, as the ``finpipe`` CLI does after
  its own runs, so a damaged lake loses at most one run however it was launched.
"""

import datetime as dt
import json
import os
import zoneinfo

import dagster as dg

from finpipe.defs.datasets import dataset_split, instruction_samples
from finpipe.defs.evaluation import adapter_evaluation, champion_adapter, evaluation_report
from finpipe.defs.market_data import daily_prices
from finpipe.defs.models import base_model, qlora_adapter
from finpipe.defs.resources import LakeResource, MarketDataResource
from finpipe.defs.statistics import price_statistics

NIGHTLY_CRON = os.environ.get("FINPIPE_NIGHTLY_CRON", "30 18 * * 1-5")
NIGHTLY_TIMEZONE = os.environ.get("FINPIPE_NIGHTLY_TIMEZONE", "America/New_York")


def _check_schedule_settings() -> None:
    """Bad schedule settings fail the code location with one line naming the variable, not a stack trace."""
    from dagster._utils.schedules import is_valid_cron_string

    if not is_valid_cron_string(NIGHTLY_CRON):
        raise ValueError(f"FINPIPE_NIGHTLY_CRON={NIGHTLY_CRON!r} is not a cron schedule (e.g. '30 18 * * 1-5')")
    try:
        zoneinfo.ZoneInfo(NIGHTLY_TIMEZONE)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"FINPIPE_NIGHTLY_TIMEZONE={NIGHTLY_TIMEZONE!r} is not a time zone "
                         "(e.g. America/New_York, Asia/Kolkata)") from None


_check_schedule_settings()

NIGHTLY_ASSETS = [daily_prices, price_statistics, instruction_samples, dataset_split, base_model, qlora_adapter,
                  adapter_evaluation, evaluation_report, champion_adapter]
#: refreshed by the automation sensor whenever an upstream partition lands (cheap: no training)
EAGER_ASSETS = [price_statistics, instruction_samples, dataset_split]

nightly_retrain = dg.define_asset_job(
    "nightly_retrain",
    selection=dg.AssetSelection.assets(*NIGHTLY_ASSETS),  # includes their asset checks
    description="Ingest the day's prices, refresh statistics and datasets, retrain (warm start from the "
    "champion), evaluate, report and promote.",
)

#: the nightly run continues from the champion's weights instead of a fresh LoRA initialisation
NIGHTLY_RUN_CONFIG = {"ops": {"qlora_adapter": {"config": {"warm_start": "champion"}}}}


#: what started a run (nightly, drift; none: manual) and why, as run tags; adapter_evaluation records both in
#: model_runs (run_trigger, trigger_reason), which `finpipe runs` shows
TRIGGER_TAG = "finpipe/trigger"
DRIFT_REASON_TAG = "finpipe/drift_reason"
DRIFT_SIGNALS_TAG = "finpipe/drift_signals"
#: a run tag value is kept short (the sensor's log has the reason in full, with every score)
MAX_TAG_CHARS = 250


@dg.schedule(job=nightly_retrain, cron_schedule=NIGHTLY_CRON, execution_timezone=NIGHTLY_TIMEZONE,
             default_status=dg.DefaultScheduleStatus.STOPPED,
             description="Weekdays after the close: the day's partition through training, evaluation and promotion.")
def nightly_schedule(context: dg.ScheduleEvaluationContext,
                     market_data: MarketDataResource) -> dg.RunRequest | dg.SkipReason:
    # the partition is the trading day that just closed, in the exchange's timezone (a manual evaluation
    # in the UI has no scheduled time: then it is today there)
    when = context.scheduled_execution_time or dt.datetime.now(zoneinfo.ZoneInfo(NIGHTLY_TIMEZONE))
    day = when.astimezone(zoneinfo.ZoneInfo(NIGHTLY_TIMEZONE)).date()
    source = market_data.price_source()
    served_until = source.available_until()
    if served_until is not None and day > served_until:  # the offline replay: a run could only fail
        return dg.SkipReason(
            f"no run for {day}: the {source.name} source serves prices up to {served_until} only. Nightly "
            f"retraining needs a live source: FINPIPE_SOURCE=yahoo (docs/operations.md, 'Nightly retraining'); "
            f"FINPIPE_REPLAY_AS_OF replays a past night offline.")
    return dg.RunRequest(run_key=f"nightly-{day.isoformat()}", partition_key=day.isoformat(),
                         run_config=NIGHTLY_RUN_CONFIG, tags={TRIGGER_TAG: "nightly"})


def _drift_inputs(lake: LakeResource):
    """(latest session, champion row {run_id, train_first, train_last} or None, statistics since train_first or None)
    from one read-only connection."""
    from finpipe.statistics.drift import FEATURES
    from finpipe.statistics.refresh import STATISTICS_TABLE

    with lake.prices_lake().connect(read_only=True) as con:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if STATISTICS_TABLE not in tables:
            return None, None, None
        latest = con.execute(f"SELECT max(date) FROM {STATISTICS_TABLE}").fetchall()[0][0]
        if "model_runs" not in tables:
            return latest, None, None
        champion = con.execute("SELECT run_id, train_first, train_last FROM model_runs WHERE status = 'champion' "
                               "ORDER BY decided_at DESC NULLS LAST LIMIT 1").fetchall()
        champion = champion[0] if champion else None
        if champion is None or champion[2] is None:
            return latest, None, None
        columns = ", ".join(["ticker", "date", *FEATURES])
        since = champion[1] or dt.date.min
        stats = con.sql(f"SELECT {columns} FROM {STATISTICS_TABLE} WHERE date >= ?", params=[since]).pl()
    return latest, {"run_id": champion[0], "train_first": champion[1], "train_last": champion[2]}, stats


@dg.sensor(job=nightly_retrain, minimum_interval_seconds=3600, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Retrains when the latest statistics drift from the champion's training window (PSI and KS of "
           "returns, volatility and RSI; the volatility regime; tickers it never saw): a nightly_retrain run of the "
           "latest session, the reason in its tags. Each (latest session, champion) is evaluated once.")
def retrain_on_drift(context: dg.SensorEvaluationContext, lake: LakeResource) -> dg.SensorResult:
    from finpipe.evaluation.report import cut
    from finpipe.market.lake import LakeLockedError
    from finpipe.statistics.drift import DriftSpec, drift_since

    try:
        latest, champion, stats = _drift_inputs(lake)
    except LakeLockedError:  # a run is writing the lake: look again at the next tick (the cursor is unchanged)
        return dg.SensorResult(skip_reason="the lake is held by another process; drift is checked at the next tick")
    except FileNotFoundError:
        return dg.SensorResult(skip_reason=f"no lake at {lake.db_path} yet")
    if latest is None:
        return dg.SensorResult(skip_reason="no price_statistics in the lake yet")
    if champion is None:
        return dg.SensorResult(skip_reason="no champion yet: nothing to compare with (`finpipe run` promotes one)")
    cursor = json.dumps({"latest": latest.isoformat(), "champion": champion["run_id"]}, sort_keys=True)
    if context.cursor == cursor:
        return dg.SensorResult(skip_reason=f"already checked: latest session {latest}, champion {champion['run_id']}")
    report = drift_since(stats, champion["train_first"], champion["train_last"], DriftSpec())
    if isinstance(report, str):  # too few sessions since the training window: look again when more land
        return dg.SensorResult(skip_reason=f"champion {champion['run_id']}: {report}", cursor=cursor)
    scores = ", ".join(f"{k} {v}" for k, v in report.scores().items() if v not in ("", None))
    if not report.drifted:
        return dg.SensorResult(skip_reason=f"{report.reason} [{scores}]", cursor=cursor)
    partition = latest.isoformat()
    if context.instance.get_run_records(dg.RunsFilter(job_name=nightly_retrain.name,
                                                      tags={"dagster/partition": partition}), limit=1):
        return dg.SensorResult(skip_reason=f"{report.reason}; a nightly_retrain run of {partition} already exists",
                               cursor=cursor)
    signals = [f.feature for f in report.features if f.drifted]
    signals += ["volatility_regime"] * report.volatility_shift + ["new_tickers"] * bool(report.new_tickers)
    context.log.info(f"drift: {report.reason} [{scores}]")
    return dg.SensorResult(cursor=cursor, run_requests=[dg.RunRequest(
        run_key=f"drift-{partition}", partition_key=partition, run_config=NIGHTLY_RUN_CONFIG,
        tags={TRIGGER_TAG: "drift", DRIFT_REASON_TAG: cut(report.reason, MAX_TAG_CHARS), DRIFT_SIGNALS_TAG: ",".join(signals),
              "finpipe/drift_champion": champion["run_id"]})])


refresh_on_new_prices = dg.AutomationConditionSensorDefinition(
    "refresh_on_new_prices",
    target=dg.AssetSelection.assets(*EAGER_ASSETS),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description="Refreshes statistics and datasets when new price partitions land (eager automation conditions).",
)


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="After each successful run: a snapshot of the lake file (the newest 3 kept, `finpipe lake restore` "
    "brings one back); a lake identical to the newest snapshot is not copied again.",
)
def snapshot_lake_after_success(context: dg.RunStatusSensorContext, lake: LakeResource) -> dg.SkipReason | None:
    from finpipe.market.lake import LakeLockedError
    from finpipe.market.snapshots import snapshot

    try:
        taken = snapshot(lake.db_path)
    except LakeLockedError:  # a writer holds the lake: the next successful run takes the snapshot
        return dg.SkipReason(f"the lake is held by another process; no snapshot after run {context.dagster_run.run_id}")
    if taken is None:
        return dg.SkipReason(f"no lake file at {lake.db_path}")
    context.log.info(f"lake snapshot after run {context.dagster_run.run_id}: {taken}")
    return None

