"""The statistics asset: per (ticker, date) market statistics, recomputed from the clean price table."""

import dagster as dg
import polars as pl

from finpipe.defs.market_data import daily_prices
from finpipe.defs.metadata import markdown_table
from finpipe.defs.partitions import REFRESH_WHEN_PRICES_LAND
from finpipe.defs.resources import LAKE_WRITER_POOL, LAKE_WRITER_TAGS, LakeResource
from finpipe.statistics import definitions
from finpipe.statistics.compute import STATISTICS_COLUMNS, compute_statistics

STATISTICS_TABLE = "price_statistics"


@dg.asset(
    deps=[daily_prices],
    group_name="statistics",
    automation_condition=REFRESH_WHEN_PRICES_LAND,
    pool=LAKE_WRITER_POOL,
    op_tags=LAKE_WRITER_TAGS,
    kinds={"polars", "duckdb"},
    description="Returns, volatility, SMAs, RSI, 52-week range, drawdown and relative performance per "
    "ticker and date (definitions: finpipe/statistics/definitions.py), in the lake table `price_statistics`.",
)
def price_statistics(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    prices_lake = lake.prices_lake()
    prices = prices_lake.query("SELECT ticker, date, close, adj_close, volume FROM prices")
    if prices.height == 0:
        raise dg.Failure("the prices table is empty: materialize daily_prices first")
    universe_of = dict(prices_lake.query("SELECT ticker, universe FROM instruments").iter_rows())
    # A full recompute is cheap (see benchmarks/statistics_scale.py: 500 tickers x 10 years in seconds)
    # and cannot drift from the definitions the way incremental window updates can.
    stats = compute_statistics(prices, universe_of).select(STATISTICS_COLUMNS)
    prices_lake.replace_table(STATISTICS_TABLE, stats)
    latest = stats.filter(pl.col("date") == pl.col("date").max().over("ticker")).select(
        "ticker", "date", "close", "ret_5d", "ret_30d", "volatility_20d", "rsi_14", "pct_vs_sma_50", "max_drawdown_252d"
    )
    coverage = stats.select(pl.exclude("ticker", "date").is_not_null().mean()).transpose(
        include_header=True, header_name="statistic", column_names=["non_null_share"]
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": stats.height,
            "tickers": stats["ticker"].n_unique(),
            "date_range": f"{stats['date'].min()} .. {stats['date'].max()}",
            "latest": dg.MetadataValue.md(markdown_table(latest)),
            "coverage": dg.MetadataValue.md(markdown_table(coverage, max_rows=50)),
            "definitions": dg.MetadataValue.md(definitions.__doc__ or ""),
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
