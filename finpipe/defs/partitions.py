"""Partitions for dated data: one partition per weekday (the union of the exchanges' session days).

A Friday partition's window runs to Monday 00:00 UTC, so partitions tile time without holes.
``end_offset=1`` exposes today's partition, which the nightly run fills after the close.
"""

import dagster as dg

TRADING_DAY_PARTITIONS_START = "2000-01-03"

trading_days = dg.TimeWindowPartitionsDefinition(
    cron_schedule="0 0 * * 1-5",
    fmt="%Y-%m-%d",
    start=TRADING_DAY_PARTITIONS_START,
    end_offset=1,
    timezone="UTC",
)

# Run tags that make one run cover a partition range (assets with a single-run backfill policy).
PARTITION_RANGE_START_TAG = "dagster/asset_partition_range_start"
PARTITION_RANGE_END_TAG = "dagster/asset_partition_range_end"

# Eager refresh of assets downstream of the prices. Plain `eager()` waits until no upstream partition is
# missing, but most weekday partitions since 2000 are never materialized (a lake holds a chosen window),
# so that guard would block forever: drop it, keep the rest (new data, nothing in progress).
REFRESH_WHEN_PRICES_LAND = dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing())
