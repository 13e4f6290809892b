"""Nightly retraining and refresh-on-new-data.

- ``nightly_retrain`` (job): the day's price partition, statistics, datasets, base model, adapter (warm-started
  from the champion), evaluation, report and promotion, in one run.
- ``nightly_schedule``: weekdays after the close, timezone-aware. Default 18:30 America/New_York (US close
  16:00 + data settling); override with ``FINPIPE_NIGHTLY_CRON`` / ``FINPIPE_NIGHTLY_TIMEZONE`` (e.g.
  ``0 18 * * 1-5`` / ``Asia/Kolkata`` for the India universe, close 15:30 IST). Off until switched on in the UI.
- ``refresh_on_new_prices``: an automation-condition sensor; statistics and datasets are ``eager``, so any new
  price partition (a manual backfill, a late day) refreshes them without retraining.
- ``snapshot_lake_after_success``: a run-status sensor; after every successful run of this code location (launched
  from the UI, the schedule or a sensor) it keeps a snapshot of the lake file, as the ``finpipe`` CLI does after
  its own runs, so a damaged lake loses at most one run however it was launched.
"""

import datetime as dt
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
                         run_config=NIGHTLY_RUN_CONFIG, tags={"finpipe/trigger": "nightly"})


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

