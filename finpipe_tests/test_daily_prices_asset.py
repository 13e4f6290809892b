"""The daily_prices asset and its checks, run for real through Dagster on a DuckDB file."""

import dagster as dg
import duckdb

from finpipe.definitions import in_groups
from finpipe.defs.partitions import PARTITION_RANGE_END_TAG, PARTITION_RANGE_START_TAG
from finpipe.paths import LAKE_DB_NAME

VALUE_COLUMNS = "ticker, date, open, high, low, close, adj_close, volume, source, simulated"


def materialize(resources, first: str, last: str | None = None, raise_on_error: bool = True):
    tags = {PARTITION_RANGE_START_TAG: first, PARTITION_RANGE_END_TAG: last or first}
    return dg.materialize(in_groups("market_data"), resources=resources, tags=tags,
                          raise_on_error=raise_on_error)


def metadata(result):
    return {k: v.value for k, v in result.asset_materializations_for_node("daily_prices")[0].metadata.items()}


def lake_rows(lake_dir, sql=f"SELECT {VALUE_COLUMNS} FROM prices ORDER BY ticker, date"):
    con = duckdb.connect(str(lake_dir / LAKE_DB_NAME), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def checks(result):
    return {c.check_name: c for c in result.get_asset_check_evaluations()}


def test_rematerializing_a_partition_range_is_idempotent(lake_resources, isolated_lake):
    resources = lake_resources()
    first = materialize(resources, "2013-02-04", "2013-03-01")
    before = lake_rows(isolated_lake)
    # 4 tickers x 19 NYSE sessions (Presidents' Day 2013-02-18 closed)
    assert len(before) == 76
    assert metadata(first)["rows_inserted"] == 76 and metadata(first)["rows_replaced"] == 0

    again = materialize(resources, "2013-02-04", "2013-03-01")
    assert lake_rows(isolated_lake) == before
    assert metadata(again)["rows_inserted"] == 0 and metadata(again)["rows_replaced"] == 76

    one_day = materialize(resources, "2013-02-20")  # a single partition inside the range
    assert lake_rows(isolated_lake) == before
    assert metadata(one_day)["rows_replaced"] == 4


def test_materialization_metadata_and_checks_on_real_replay_data(lake_resources, isolated_lake):
    result = materialize(lake_resources(), "2013-02-25", "2013-03-01")
    meta = metadata(result)
    assert meta["dagster/row_count"] == 20
    assert meta["tickers_ok"] == ["AAPL", "MSFT", "IBM", "GOOG"]
    assert meta["tickers_failed"] == {}
    assert meta["date_range"] == "2013-02-25 .. 2013-03-01"
    assert meta["source"] == "replay:bokeh-sampledata" and meta["simulated"] is False
    assert "| AAPL | 2013-03-01 |" in meta["preview"]
    assert meta["lake_path"] == str(isolated_lake / LAKE_DB_NAME)
    evaluations = checks(result)
    assert set(evaluations) == {"prices_keys_unique", "prices_ohlc_consistent", "prices_no_calendar_gaps", "prices_fresh"}
    assert all(c.passed for c in evaluations.values())
    # AAPL's real close on 2013-03-01 (Quandl WIKI, unadjusted)
    assert lake_rows(isolated_lake, "SELECT close FROM prices WHERE ticker='AAPL' AND date='2013-03-01'") == [(430.47,)]


def test_a_range_the_source_cannot_serve_fails_clearly_and_writes_nothing(lake_resources, isolated_lake):
    resources = lake_resources(replay_as_of="2013-02-28")
    materialize(resources, "2013-02-27")
    before = lake_rows(isolated_lake)
    result = materialize(resources, "2013-03-01", raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "serves data up to 2013-02-28" in failure.event_specific_data.error.message
    assert lake_rows(isolated_lake) == before
    assert lake_rows(isolated_lake, "SELECT count(*) FROM ingest_log WHERE start_date = '2013-03-01'") == [(0,)]


def test_lake_refuses_to_mix_simulated_rows_with_real_ones(lake_resources, isolated_lake):
    materialize(lake_resources(source="replay"), "2013-02-25", "2013-03-01")
    before = lake_rows(isolated_lake)
    result = materialize(lake_resources(source="simulated"), "2013-02-25", "2013-03-01", raise_on_error=False)
    assert not result.success
    assert lake_rows(isolated_lake) == before
    reasons = lake_rows(isolated_lake, "SELECT DISTINCT status, reason FROM ingest_log WHERE source = 'simulated'")
    assert len(reasons) == 4 and all(s == "failed" and "refused" in r and "mix" in r for s, r in reasons)


def test_ohlc_and_key_checks_fail_on_rows_another_writer_slipped_in(lake_resources, isolated_lake):
    resources = lake_resources()
    materialize(resources, "2013-02-25", "2013-03-01")
    con = duckdb.connect(str(isolated_lake / LAKE_DB_NAME))
    con.execute("UPDATE prices SET high = low - 1 WHERE ticker = 'IBM' AND date = '2013-02-26'")
    con.close()
    # the next run's checks look at the whole table, not only at the partition they follow
    result = materialize(resources, "2013-03-01", raise_on_error=False)
    evaluations = checks(result)
    assert not evaluations["prices_ohlc_consistent"].passed
    assert evaluations["prices_ohlc_consistent"].metadata["details"].value["violations"] == 1
    assert evaluations["prices_keys_unique"].passed


def test_gap_and_freshness_checks_see_missing_sessions(lake_resources, isolated_lake):
    resources = lake_resources()
    materialize(resources, "2013-01-02", "2013-03-01")
    con = duckdb.connect(str(isolated_lake / LAKE_DB_NAME))
    con.execute("DELETE FROM prices WHERE ticker = 'MSFT' AND date BETWEEN '2013-01-14' AND '2013-01-18'")
    con.execute("DELETE FROM prices WHERE ticker = 'IBM' AND date >= '2013-02-25'")
    con.close()
    result = materialize(resources, "2013-02-22", raise_on_error=False)
    evaluations = checks(result)
    gaps = evaluations["prices_no_calendar_gaps"]
    assert not gaps.passed and gaps.metadata["details"].value["MSFT"]["missing"] == 5
    fresh = evaluations["prices_fresh"]
    assert not fresh.passed and fresh.severity == dg.AssetCheckSeverity.WARN
    assert fresh.metadata["details"].value["lag_sessions"]["IBM"] == 5
