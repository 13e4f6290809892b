"""The statistics asset: per (ticker, date) market statistics, from the clean price table.

A refresh is incremental when the last refresh's table is still valid for every date it holds (the newest
ingests only appended sessions after each ticker's last statistics date) and a full recompute otherwise; see
``finpipe.statistics.refresh.refresh_plan``.
"""

import dagster as dg

from finpipe.defs.market_data import daily_prices
from finpipe.defs.metadata import markdown_table
from finpipe.defs.partitions import REFRESH_WHEN_PRICES_LAND
from finpipe.defs.resources import LAKE_WRITER_POOL, LAKE_WRITER_TAGS, LakeResource
from finpipe.runtime import heartbeat
from finpipe.statistics import measures
from finpipe.statistics.compute import STATISTICS_COLUMNS
from finpipe.statistics.refresh import STATISTICS_TABLE, refresh_statistics


@dg.asset(
    deps=[daily_prices],
    group_name="statistics",
    automation_condition=REFRESH_WHEN_PRICES_LAND,
    pool=LAKE_WRITER_POOL,
    op_tags=LAKE_WRITER_TAGS,
    kinds={"polars", "duckdb"},
    description="Returns, volatility, SMAs, RSI, 52-week range, drawdown and relative performance per "
    "ticker and date (definitions: finpipe/statistics/measures.py), in the lake table `price_statistics`.",
)
def price_statistics(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    prices_lake = lake.prices_lake()
    with prices_lake.connect() as con, heartbeat(context.log.info, "price_statistics"):
        try:
            outcome = refresh_statistics(con)
        except ValueError as exc:
            raise dg.Failure(str(exc)) from exc
        totals = con.execute(
            f"SELECT count(*), count(DISTINCT ticker), min(date), max(date) FROM {STATISTICS_TABLE}"
        ).fetchall()[0]
        latest = con.sql(
            f"""SELECT ticker, date, close, ret_5d, ret_30d, volatility_20d, rsi_14, pct_vs_sma_50, max_drawdown_252d
                FROM {STATISTICS_TABLE} QUALIFY date = max(date) OVER (PARTITION BY ticker) ORDER BY ticker"""
        ).pl()
        coverage_sql = ", ".join(f'avg(("{c}" IS NOT NULL)::DOUBLE) AS "{c}"' for c in STATISTICS_COLUMNS[2:])
        coverage = con.sql(f"SELECT {coverage_sql} FROM {STATISTICS_TABLE}").pl().transpose(
            include_header=True, header_name="statistic", column_names=["non_null_share"]
        )
    context.log.info(f"price_statistics: {outcome['refresh']} refresh ({outcome['refresh_reason']}), "
                     f"{outcome['rows_written']} rows written")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": totals[0],
            "tickers": totals[1],
            "date_range": f"{totals[2]} .. {totals[3]}",
            "refresh": outcome["refresh"],
            "refresh_reason": outcome["refresh_reason"],
            "rows_recomputed": outcome["rows_written"],
            "rows_written": outcome["rows_written"],
            "dates_written": outcome["dates_written"],
            "price_rows_read": outcome["price_rows_read"],
            "latest": dg.MetadataValue.md(markdown_table(latest)),
            "coverage": dg.MetadataValue.md(markdown_table(coverage, max_rows=50)),
            "definitions": dg.MetadataValue.md(measures.__doc__ or ""),
        }
    )


@dg.asset_check(asset=price_statistics, blocking=True,
                description="One statistics row per price row; RSI within [0, 100]; volatility >= 0; drawdown <= 0.")
def statistics_sane(lake: LakeResource) -> dg.AssetCheckResult:
    with lake.prices_lake().connect(read_only=True) as con:
        (prices, stats, bad_rsi, bad_vol, bad_dd) = con.execute(
            f"""
            SELECT (SELECT count(*) FROM prices), count(*),
                   count(*) FILTER (WHERE rsi_14 < 0 OR rsi_14 > 100),
                   count(*) FILTER (WHERE volatility_20d < 0),
                   count(*) FILTER (WHERE max_drawdown_252d > 0)
            FROM {STATISTICS_TABLE}
            """
        ).fetchall()[0]
    passed = prices == stats and bad_rsi == bad_vol == bad_dd == 0
    return dg.AssetCheckResult(
        passed=passed,
        metadata={"price_rows": prices, "statistics_rows": stats, "rsi_out_of_range": bad_rsi,
                  "negative_volatility": bad_vol, "positive_drawdown": bad_dd},
    )
