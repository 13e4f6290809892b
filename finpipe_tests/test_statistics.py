"""Statistics against values computed by hand on small, purpose-built price series."""

import datetime as dt
import math

import polars as pl
import pytest

from finpipe.statistics.compute import STATISTICS_COLUMNS, compute_statistics, rolling_max_drawdown


def series(closes, ticker="T", adj=None, volume=None) -> pl.DataFrame:
    n = len(closes)
    start = dt.date(2020, 1, 1)
    return pl.DataFrame({
        "ticker": [ticker] * n,
        "date": [start + dt.timedelta(days=i) for i in range(n)],
        "close": [float(c) for c in closes],
        "adj_close": [float(c) for c in (adj if adj is not None else closes)],
        "volume": volume if volume is not None else [1000] * n,
    })


def at(stats: pl.DataFrame, row: int, column: str, ticker: str = "T"):
    return stats.filter(pl.col("ticker") == ticker).sort("date")[column][row]


def test_returns_are_simple_returns_over_trading_rows():
    closes = [100 * 1.01**i for i in range(40)]
    stats = compute_statistics(series(closes))
    assert at(stats, 0, "daily_return") is None
    assert at(stats, 1, "daily_return") == pytest.approx(0.01)
    assert at(stats, 5, "ret_5d") == pytest.approx(1.01**5 - 1)
    assert at(stats, 30, "ret_30d") == pytest.approx(1.01**30 - 1)
    assert at(stats, 29, "ret_30d") is None  # window not full yet
    assert at(stats, 39, "volatility_20d") == pytest.approx(0.0, abs=1e-12)  # constant returns
    assert at(stats, 39, "rsi_14") == 100.0  # no losses


def test_volatility_is_annualized_sample_std_of_20_returns():
    closes = [100.0]
    for i in range(30):
        closes.append(closes[-1] * (1.01 if i % 2 == 0 else 0.99))
    stats = compute_statistics(series(closes))
    # 10 returns of +1% and 10 of -1%: mean 0, sample std = 0.01 * sqrt(20/19)
    expected = 0.01 * math.sqrt(20 / 19) * math.sqrt(252)
    assert at(stats, 30, "volatility_20d") == pytest.approx(expected, rel=1e-9)
    assert at(stats, 19, "volatility_20d") is None  # 19 returns only


def test_rsi_follows_wilder_by_hand():
    closes = [100.0]
    for i in range(20):
        closes.append(closes[-1] + (2 if i % 2 == 0 else -1))
    stats = compute_statistics(series(closes))
    assert at(stats, 13, "rsi_14") is None
    # first 14 changes: seven +2, seven -1 -> avg gain 1.0, avg loss 0.5 -> RS 2
    assert at(stats, 14, "rsi_14") == pytest.approx(100 - 100 / 3)
    # next change +2: gain 13/14*1 + 2/14 = 15/14, loss 13/14*0.5 = 6.5/14 -> RS 15/6.5
    assert at(stats, 15, "rsi_14") == pytest.approx(100 - 100 / (1 + 15 / 6.5))


def test_sma_and_position_use_adjusted_prices_in_printed_units():
    # a 2:1 split after row 29: printed close halves, the adjusted close is continuous
    adj = [50.0] * 60
    closes = [100.0] * 30 + [50.0] * 30
    stats = compute_statistics(series(closes, adj=adj))
    assert at(stats, 9, "sma_10") == pytest.approx(100.0)
    assert at(stats, 35, "sma_10") == pytest.approx(50.0)  # not the 75 a naive mix of pre/post split gives
    assert at(stats, 35, "pct_vs_sma_10") == pytest.approx(0.0)
    assert at(stats, 35, "ret_14d") == pytest.approx(0.0)  # the split is not a -50% return
    sloped = compute_statistics(series([float(i) for i in range(1, 61)]))
    assert at(sloped, 59, "sma_50") == pytest.approx(sum(range(11, 61)) / 50)
    assert at(sloped, 59, "pct_vs_sma_50") == pytest.approx(60 / 35.5 - 1)


def test_52_week_range_and_max_drawdown():
    # up from 100 to 200 over 101 rows, down to 150 by row 150, then flat to row 299
    closes = [100 + i for i in range(101)] + [200 - i for i in range(1, 51)] + [150.0] * 149
    stats = compute_statistics(series(closes))
    assert at(stats, 250, "high_52w") is None  # 251 rows: window not full
    assert at(stats, 299, "high_52w") == pytest.approx(200.0)
    assert at(stats, 299, "low_52w") == pytest.approx(148.0)  # row 48 (148) is the oldest in the window
    assert at(stats, 299, "dist_52w_high") == pytest.approx(-0.25)
    assert at(stats, 299, "max_drawdown_252d") == pytest.approx(-0.25)
    assert at(stats, 251, "max_drawdown_252d") == pytest.approx(-0.25)


def test_rolling_max_drawdown_by_hand():
    dd = rolling_max_drawdown([10.0, 8.0, 12.0, 6.0, 9.0], window=3)
    assert math.isnan(dd[0]) and math.isnan(dd[1])
    assert dd[2] == pytest.approx(-0.2)  # 10 -> 8
    assert dd[3] == pytest.approx(-0.5)  # 12 -> 6
    assert dd[4] == pytest.approx(-0.5)


def test_average_volume_and_relative_performance():
    a = series([100.0] * 5 + [110.0], ticker="A", volume=[10, 20, 30, 40, 50, 60])
    b = series([100.0] * 5 + [102.0], ticker="B")
    stats = compute_statistics(pl.concat([a, b]), {"A": "u", "B": "u"})
    assert at(stats, 5, "ret_5d", "A") == pytest.approx(0.10)
    assert at(stats, 5, "rel_ret_5d", "A") == pytest.approx(0.04)
    assert at(stats, 5, "rel_ret_5d", "B") == pytest.approx(-0.04)
    wide = compute_statistics(series([1.0] * 25, volume=list(range(1, 26))))
    assert at(wide, 24, "avg_volume_20d") == pytest.approx(sum(range(6, 26)) / 20)


def test_every_ticker_is_computed_independently_of_row_order():
    a = series([100 * 1.02**i for i in range(60)], ticker="A")
    b = series([50 * 0.99**i for i in range(60)], ticker="B")
    forward = compute_statistics(pl.concat([a, b])).select(STATISTICS_COLUMNS).sort("ticker", "date")
    shuffled = compute_statistics(pl.concat([b, a]).sample(fraction=1.0, shuffle=True, seed=1))
    assert shuffled.select(STATISTICS_COLUMNS).sort("ticker", "date").equals(forward)


# ------------------------------------------------------------------------------------------------ incremental


def assert_same_statistics(ours: pl.DataFrame, reference: pl.DataFrame) -> None:
    """Same rows and columns; every float equal within rtol 1e-9 (atol 1e-12) with identical nulls."""
    import numpy as np

    ours = ours.select(STATISTICS_COLUMNS).sort("ticker", "date")
    reference = reference.select(STATISTICS_COLUMNS).sort("ticker", "date")
    assert ours.height == reference.height
    assert ours.select("ticker", "date").equals(reference.select("ticker", "date"))
    for col in STATISTICS_COLUMNS[2:]:
        a, b = ours[col], reference[col]
        assert a.is_null().to_list() == b.is_null().to_list(), f"{col}: null patterns differ"
        np.testing.assert_allclose(a.cast(pl.Float64).to_numpy(), b.cast(pl.Float64).to_numpy(),
                                   rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=col)


@pytest.fixture(scope="module")
def replay_prices() -> pl.DataFrame:
    """~1,050 real replay sessions x 4 tickers, reshaped to per-ticker calendars: one ticker starts a year late,
    one misses every 7th session (the tail must be taken per ticker by row count, not by calendar date)."""
    from finpipe.market.ingest import IngestRequest, ingest
    from finpipe.market.sources import ReplaySource
    from finpipe.market.universes import US_CORE

    prices = ingest(ReplaySource(), IngestRequest(US_CORE, dt.date(2009, 1, 2), dt.date(2013, 3, 1))).clean
    tickers = sorted(prices["ticker"].unique().to_list())
    row = pl.int_range(pl.len()).over("ticker")
    return prices.sort("ticker", "date").filter(
        ~((pl.col("ticker") == tickers[1]) & (pl.col("date") < dt.date(2010, 1, 4)))
        & ~((pl.col("ticker") == tickers[2]) & (row % 7 == 3))
    )


@pytest.mark.parametrize("k", [1, 5])
def test_incremental_equals_full_recompute_on_replay_data(replay_prices, k):
    from finpipe.statistics.compute import INCREMENTAL_TAIL_SESSIONS, compute_statistics_for_dates

    tickers = sorted(replay_prices["ticker"].unique().to_list())
    universe_of = {t: "u1" if i % 2 else "u2" for i, t in enumerate(tickers)}
    dates = sorted(replay_prices["date"].unique().to_list())
    new_dates = dates[-k:]
    full = compute_statistics(replay_prices, universe_of).select(STATISTICS_COLUMNS)
    before = compute_statistics(replay_prices.filter(pl.col("date") < new_dates[0]), universe_of)
    new = compute_statistics_for_dates(replay_prices, new_dates, universe_of)
    assert new["date"].unique().sort().to_list() == new_dates
    assert new.height == replay_prices.filter(pl.col("date").is_in(new_dates)).height
    assert_same_statistics(pl.concat([before.select(STATISTICS_COLUMNS), new]), full)
    # every ticker has more history than the tail, so the window really is truncated
    assert replay_prices.group_by("ticker").len()["len"].min() > INCREMENTAL_TAIL_SESSIONS + k


def test_incremental_tail_is_derived_from_the_definitions():
    from finpipe.statistics.compute import INCREMENTAL_TAIL_SESSIONS, RSI_EXACT_TAIL, trailing_window
    from finpipe.statistics.measures import YEAR_WINDOW

    assert RSI_EXACT_TAIL == 513 and INCREMENTAL_TAIL_SESSIONS == 513 > YEAR_WINDOW
    a = series([float(i) for i in range(1, 11)], ticker="A")
    b = series([float(i) for i in range(1, 11)], ticker="B").filter(pl.col("date") != dt.date(2020, 1, 8))
    window = trailing_window(pl.concat([a, b]), dt.date(2020, 1, 9), tail=3)  # by rows, not calendar days
    assert window.filter(pl.col("ticker") == "A")["date"].dt.day().to_list() == [6, 7, 8, 9, 10]
    assert window.filter(pl.col("ticker") == "B")["date"].dt.day().to_list() == [5, 6, 7, 9, 10]


def test_price_statistics_refreshes_incrementally_through_dagster(lake_resources):
    import dagster as dg

    from finpipe.defs.resources import LakeResource
    from finpipe.defs.statistics import STATISTICS_TABLE, price_statistics, statistics_sane
    from finpipe_tests.helpers import ingest

    resources = lake_resources()
    lake: LakeResource = resources["lake"]

    def refresh() -> dict:
        result = dg.materialize([price_statistics, statistics_sane], resources={"lake": lake})
        assert result.success and all(c.passed for c in result.get_asset_check_evaluations())
        return {k: v.value for k, v in result.asset_materializations_for_node("price_statistics")[0].metadata.items()}

    def assert_table_is_a_full_recompute():
        prices_lake = lake.prices_lake()
        prices = prices_lake.query("SELECT ticker, date, close, adj_close, volume FROM prices")
        universe_of = dict(prices_lake.query("SELECT ticker, universe FROM instruments").iter_rows())
        assert_same_statistics(prices_lake.query(f"SELECT * FROM {STATISTICS_TABLE}"),
                               compute_statistics(prices, universe_of))

    ingest(resources, "2010-06-01", "2013-02-25")
    first = refresh()
    assert first["refresh"] == "full" and first["rows_written"] == first["dagster/row_count"]

    ingest(resources, "2013-02-26", "2013-03-01")  # the next four sessions
    second = refresh()
    assert second["refresh"] == "incremental", second["refresh_reason"]
    assert second["dates_written"] == 4 and second["rows_written"] == 4 * second["tickers"]
    assert second["dagster/row_count"] == first["dagster/row_count"] + second["rows_written"]
    assert_table_is_a_full_recompute()

    third = refresh()  # nothing new: nothing written
    assert third["refresh"] == "incremental" and third["rows_written"] == 0

    ingest(resources, "2012-06-01", "2012-06-01")  # an old partition re-ingested: its rows are replaced
    fourth = refresh()
    assert fourth["refresh"] == "full", fourth["refresh_reason"]
    assert "rewritten" in fourth["refresh_reason"]
    assert_table_is_a_full_recompute()

    with lake.prices_lake().connect() as con:  # a table written by anything else carries no refresh state
        con.execute(f"COMMENT ON TABLE {STATISTICS_TABLE} IS NULL")
    assert refresh()["refresh"] == "full"


@pytest.mark.parametrize("sparse", [False, True])
def test_lake_trailing_window_read_equals_the_polars_window(replay_prices, sparse):
    """``read_trailing_window`` (SQL, reads only after a calendar bound when that provably suffices) returns
    exactly ``trailing_window``'s rows, also when a sparse ticker's tail reaches before the bound."""
    import duckdb

    from finpipe.statistics.compute import INCREMENTAL_TAIL_SESSIONS, trailing_window
    from finpipe.statistics.refresh import read_trailing_window

    prices = replay_prices
    if sparse:
        first = sorted(prices["ticker"].unique().to_list())[0]
        prices = prices.filter((pl.col("ticker") != first) | (pl.int_range(pl.len()).over("ticker") % 3 == 0))
    first_date = sorted(prices["date"].unique().to_list())[-3]
    con = duckdb.connect()
    con.register("incoming", prices.to_arrow())
    con.execute("CREATE TABLE prices AS SELECT * FROM incoming")
    ours = read_trailing_window(con, first_date).sort("ticker", "date")
    expected = trailing_window(prices, first_date, INCREMENTAL_TAIL_SESSIONS)
    assert ours.equals(expected)
    assert ours.height < prices.height
