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
