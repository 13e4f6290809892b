"""Market data assets: daily prices ingested into the DuckDB lake, and the checks that guard them."""


import datetime as dt

import dagster as dg
import polars as pl

from finpipe.defs.metadata import markdown_table
from finpipe.defs.partitions import trading_days
from finpipe.defs.resources import LAKE_WRITER_POOL, LAKE_WRITER_TAGS, LakeResource, MarketDataResource
from finpipe.market import quality
from finpipe.market.ingest import FAILED, INCOMPLETE, NO_SESSIONS, OK, IngestRequest, ingest
from finpipe.market.lake import CorruptLakeError
from finpipe.runtime import heartbeat


@dg.asset(
    partitions_def=trading_days,
    backfill_policy=dg.BackfillPolicy.single_run(),
    # The network edge: a transient Yahoo outage gets retried with backoff before the run fails.
    retry_policy=dg.RetryPolicy(max_retries=2, delay=15, backoff=dg.Backoff.EXPONENTIAL),
    group_name="market_data",
    pool=LAKE_WRITER_POOL,
    op_tags=LAKE_WRITER_TAGS,
    kinds={"duckdb", "polars"},
    description="Daily OHLCV bars for the configured universe, upserted into the lake table `prices` "
    "(primary key ticker, date); invalid rows go to `price_rejects` with the reason. One partition per weekday "
    "since 2000 so that any source's history fits; a lake holds the window you ingest, and the other partitions "
    "show as missing. The offline replay (the default source) serves 2000-03-01..2013-03-01 only: materialize "
    "a range inside it (`finpipe run` does); days after it need FINPIPE_SOURCE=yahoo.",
)
def daily_prices(
    context: dg.AssetExecutionContext, lake: LakeResource, market_data: MarketDataResource
) -> dg.MaterializeResult:
    window = context.partition_time_window
    start = window.start.date()
    end = window.end.date() - dt.timedelta(days=1)  # the window end is exclusive
    universe = market_data.get_universe()
    source = market_data.price_source()
    context.log.info(f"ingesting {universe.name} ({len(universe.tickers)} tickers) {start}..{end} from {source.name}")

    try:
        with heartbeat(context.log.info, "ingesting"):
            batch = ingest(source, IngestRequest(universe, start, end))
    except ValueError as exc:  # a request no retry can fix (a date outside the calendar, a bad universe)
        raise dg.Failure(description=f"cannot ingest {start}..{end}: {exc}", allow_retries=False) from None
    expected = [o for o in batch.outcomes if o.status != NO_SESSIONS]
    if expected and all(o.status == FAILED for o in expected):
        # Nothing usable arrived although sessions were expected: fail loudly, write nothing.
        offline = getattr(source, "offline", None)
        raise dg.Failure(
            description=(f"{source.name} is unreachable ({offline}): offline, use the replay source "
                         "(FINPIPE_SOURCE=replay)" if offline else
                         f"every ticker failed from source {source.name} for {start}..{end}: "
                         + "; ".join(f"{o.ticker}: {o.reason}" for o in expected[:5])),
            metadata={"failures": {o.ticker: o.reason for o in expected}},
            allow_retries=market_data.retry_when_all_fail and source.name == "yahoo" and not offline,
        )

    prices_lake = lake.prices_lake()
    try:
        with heartbeat(context.log.info, f"writing {batch.clean.height:,} rows into the lake"):
            summary = prices_lake.write_batch(batch, run_id=context.run_id)
    except (CorruptLakeError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        raise dg.Failure(description=f"cannot write the lake: {exc}", metadata={"error": type(exc).__name__},
                         allow_retries=False) from None
    by_status = {s: [o.ticker for o in summary.outcomes if o.status == s] for s in (OK, INCOMPLETE, FAILED, NO_SESSIONS)}
    for o in summary.outcomes:
        if o.status == FAILED:
            context.log.warning(f"{o.ticker} failed: {o.reason}")
    if summary.refused and not by_status[OK] and not by_status[INCOMPLETE]:
        # The lake refused every ticker (mixed sources): the run must not look like a success.
        raise dg.Failure(
            description="the lake refused every ticker: " + "; ".join(summary.refused.values()),
            metadata={"refused": summary.refused},
            allow_retries=False,
        )

    with prices_lake.connect(read_only=True) as con:
        (total_rows,) = con.execute("SELECT count(*) FROM prices").fetchall()[0]
        batch_range = con.execute(
            "SELECT min(date), max(date) FROM prices WHERE date BETWEEN ? AND ?", [start, end]
        ).fetchall()[0]
        preview = con.sql(
            "SELECT ticker, date, open, high, low, close, adj_close, volume, source FROM prices "
            "WHERE date BETWEEN ? AND ? ORDER BY date DESC, ticker LIMIT 10", params=[start, end]
        ).pl()
    outcomes = pl.DataFrame([o.__dict__ for o in summary.outcomes])
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dg.MetadataValue.int(total_rows),
            "rows_inserted": summary.inserted,
            "rows_replaced": summary.replaced,
            "rows_rejected": summary.rejected,
            "tickers_ok": dg.MetadataValue.json(by_status[OK]),
            "tickers_incomplete": dg.MetadataValue.json(by_status[INCOMPLETE]),
            "tickers_failed": dg.MetadataValue.json({o.ticker: o.reason for o in summary.outcomes if o.status == FAILED}),
            "tickers_without_sessions": dg.MetadataValue.json(by_status[NO_SESSIONS]),
            "requested_range": f"{start} .. {end}",
            "date_range": f"{batch_range[0]} .. {batch_range[1]}" if batch_range[0] else "no rows in range",
            "source": source.name,
            "simulated": source.simulated,
            "universe": universe.name,
            "lake_path": dg.MetadataValue.path(str(prices_lake.path)),
            "outcomes": dg.MetadataValue.md(markdown_table(outcomes)),
            "preview": dg.MetadataValue.md(markdown_table(preview)),
        }
    )


def _check_result(result: quality.RuleResult, severity=dg.AssetCheckSeverity.ERROR) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=result.passed,
        severity=severity,
        description=result.summary,
        metadata={"summary": result.summary, "details": dg.MetadataValue.json(result.details)},
    )


@dg.asset_check(asset=daily_prices, blocking=True, description="No (ticker, date) key appears twice or is null.")
def prices_keys_unique(lake: LakeResource) -> dg.AssetCheckResult:
    with lake.prices_lake().connect(read_only=True) as con:
        return _check_result(quality.unique_keys(con))


@dg.asset_check(asset=daily_prices, blocking=True,
                description="low <= open, close <= high; prices > 0; volume >= 0 on every row.")
def prices_ohlc_consistent(lake: LakeResource) -> dg.AssetCheckResult:
    with lake.prices_lake().connect(read_only=True) as con:
        return _check_result(quality.ohlc_consistent(con))


@dg.asset_check(asset=daily_prices, blocking=True,
                description="No ticker misses more than 1% of its exchange's sessions between its first and last row.")
def prices_no_calendar_gaps(lake: LakeResource) -> dg.AssetCheckResult:
    with lake.prices_lake().connect(read_only=True) as con:
        return _check_result(quality.calendar_gaps(con, max_missing_fraction=0.01))


@dg.asset_check(asset=daily_prices,
                description="Every ticker's latest row is within 3 sessions of the lake's newest date.")
def prices_fresh(lake: LakeResource) -> dg.AssetCheckResult:
    with lake.prices_lake().connect(read_only=True) as con:
        return _check_result(quality.freshness(con, max_lag_sessions=3), severity=dg.AssetCheckSeverity.WARN)
