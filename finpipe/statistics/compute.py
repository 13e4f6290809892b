"""Vectorized computation of the statistics defined in ``finpipe.statistics.measures``."""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from finpipe.statistics.measures import (
    RETURN_WINDOWS,
    RSI_WINDOW,
    SMA_WINDOWS,
    TRADING_DAYS_PER_YEAR,
    VOLATILITY_WINDOW,
    VOLUME_WINDOW,
    YEAR_WINDOW,
)

INPUT_COLUMNS = ("ticker", "date", "close", "adj_close", "volume")


def rolling_max_drawdown(prices: np.ndarray, window: int) -> np.ndarray:
    """Worst peak-to-trough fall within each trailing ``window`` of ``prices`` (NaN until full)."""
    n = len(prices)
    out = np.full(n, np.nan)
    if n < window:
        return out
    windows = np.lib.stride_tricks.sliding_window_view(prices, window)  # (n - window + 1, window), a view
    peaks = np.maximum.accumulate(windows, axis=1)
    out[window - 1:] = (windows / peaks - 1.0).min(axis=1)
    return out


def compute_statistics(prices: pl.DataFrame, universe_of: dict[str, str] | None = None) -> pl.DataFrame:
    """Per (ticker, date) statistics from clean daily prices (any row order; one row per key).

    ``universe_of`` maps ticker -> universe name for the cross-sectional ``rel_ret_Nd``; tickers not in it
    form one group.
    """
    df = prices.select(INPUT_COLUMNS).sort("ticker", "date")
    by = "ticker"
    p = pl.col("adj_close")
    scale = pl.col("close") / pl.col("adj_close")  # adjusted level -> the date's printed units

    exprs = [(p / p.shift(n).over(by) - 1).alias(f"ret_{n}d") for n in RETURN_WINDOWS]
    df = df.with_columns(exprs).with_columns(daily_return=pl.col("ret_1d"))
    df = df.with_columns(
        volatility_20d=pl.col("daily_return").rolling_std(VOLATILITY_WINDOW, ddof=1).over(by)
        * math.sqrt(TRADING_DAYS_PER_YEAR),
        **{f"sma_{n}": p.rolling_mean(n).over(by) * scale for n in SMA_WINDOWS},
        high_52w=p.rolling_max(YEAR_WINDOW).over(by) * scale,
        low_52w=p.rolling_min(YEAR_WINDOW).over(by) * scale,
        avg_volume_20d=pl.col("volume").cast(pl.Float64).rolling_mean(VOLUME_WINDOW).over(by),
    )
    df = df.with_columns(
        **{f"pct_vs_sma_{n}": pl.col("close") / pl.col(f"sma_{n}") - 1 for n in SMA_WINDOWS},
        dist_52w_high=pl.col("close") / pl.col("high_52w") - 1,
        dist_52w_low=pl.col("close") / pl.col("low_52w") - 1,
    )

    # Wilder's RSI: seed = simple mean of the first 14 gains/losses, then y = y_prev * 13/14 + x / 14,
    # which is an adjust=False EWM started at the seed (nulls before it are skipped).
    change = p.diff().over(by)
    row = pl.int_range(pl.len()).over(by)

    def wilder(x: pl.Expr) -> pl.Expr:
        seeded = pl.when(row < RSI_WINDOW).then(None).when(row == RSI_WINDOW).then(
            x.rolling_mean(RSI_WINDOW).over(by)
        ).otherwise(x)
        return seeded.ewm_mean(alpha=1.0 / RSI_WINDOW, adjust=False).over(by)

    df = df.with_columns(
        _gain=wilder(change.clip(lower_bound=0)), _loss=wilder((-change).clip(lower_bound=0))
    ).with_columns(
        rsi_14=pl.when(pl.col("_gain").is_null()).then(None)
        .when(pl.col("_loss") == 0).then(100.0)
        .otherwise(100 - 100 / (1 + pl.col("_gain") / pl.col("_loss")))
    ).drop("_gain", "_loss")

    # Path-dependent: per ticker with numpy over a strided view (no Python loop over dates).
    drawdowns = np.concatenate(
        [rolling_max_drawdown(g["adj_close"].to_numpy(), YEAR_WINDOW) for g in df.partition_by(by, maintain_order=True)]
    ) if df.height else np.array([])
    df = df.with_columns(max_drawdown_252d=pl.Series(drawdowns, dtype=pl.Float64).fill_nan(None))

    group = pl.col("ticker").replace_strict(universe_of, default="_all") if universe_of else pl.lit("_all")
    df = df.with_columns(_group=group).with_columns(
        [(pl.col(f"ret_{n}d") - pl.col(f"ret_{n}d").mean().over("_group", "date")).alias(f"rel_ret_{n}d")
         for n in RETURN_WINDOWS]
    ).drop("_group")
    return df.with_columns(pl.selectors.float().fill_nan(None))


STATISTICS_COLUMNS = (
    ["ticker", "date", "close", "adj_close", "volume", "daily_return"]
    + [f"ret_{n}d" for n in RETURN_WINDOWS]
    + ["volatility_20d"]
    + [f"sma_{n}" for n in SMA_WINDOWS]
    + [f"pct_vs_sma_{n}" for n in SMA_WINDOWS]
    + ["rsi_14", "high_52w", "low_52w", "dist_52w_high", "dist_52w_low", "max_drawdown_252d", "avg_volume_20d"]
    + [f"rel_ret_{n}d" for n in RETURN_WINDOWS]
)


# ------------------------------------------------------------------------------------------------ incremental

# Rows of history (per ticker, before the first recomputed date) that make a recompute of later dates agree with a
# full recompute. Every plain window looks back at most YEAR_WINDOW (252) rows (52-week range, drawdown; returns,
# SMAs, volatility and volume need fewer), but Wilder's RSI is an exponential recursion seeded on the ticker's
# 15th row, so it depends on the whole history: a different start changes the averages by (13/14)^k times the
# seeds' difference after k further rows. With k = 498 that factor is < 1e-16, so 15 + 498 = 513 rows leave
# rsi_14 equal to the full recompute to double precision (benchmarks/nightly_increment.py measures it, and the
# error a 252-row tail would leave).
RSI_EXACT_TAIL = RSI_WINDOW + 1 + math.ceil(math.log(1e-16) / math.log(1 - 1 / RSI_WINDOW))  # 513
INCREMENTAL_TAIL_SESSIONS = max(
    RSI_EXACT_TAIL, YEAR_WINDOW, max(RETURN_WINDOWS), *SMA_WINDOWS, VOLATILITY_WINDOW + 1, VOLUME_WINDOW
)


def trailing_window(prices: pl.DataFrame, first_date, tail: int = INCREMENTAL_TAIL_SESSIONS) -> pl.DataFrame:
    """Per ticker: every row dated ``first_date`` or later plus the ``tail`` rows before it.

    The window is taken per ticker by row count, not by calendar date: tickers trade on different calendars
    (and may have gaps), and every statistic counts rows of its ticker.
    """
    before = (pl.col("date") < first_date).cast(pl.Int64)
    rank_from_end = before.cum_sum(reverse=True).over("ticker")  # 1 = the last row before first_date
    return (
        prices.select(INPUT_COLUMNS)
        .sort("ticker", "date")
        .filter((pl.col("date") >= first_date) | (rank_from_end <= tail))
    )


def compute_statistics_for_dates(
    prices: pl.DataFrame,
    dates,
    universe_of: dict[str, str] | None = None,
    tail: int = INCREMENTAL_TAIL_SESSIONS,
) -> pl.DataFrame:
    """The statistics rows of ``dates`` only (every ticker that has a price on one of them), equal to what
    ``compute_statistics`` over the whole history gives for those rows (within ~1e-11, identical nulls).

    ``prices`` must hold, per ticker, at least its last ``tail`` rows before ``min(dates)`` and all its rows from
    then on (more history is fine: it is trimmed here with ``trailing_window``). ``rel_ret_Nd`` is the
    cross-sectional mean over every ticker priced on the date, exactly like the full recompute, because every
    row dated ``>= min(dates)`` is kept for every ticker. Columns: ``STATISTICS_COLUMNS``.
    """
    dates = sorted(set(dates))
    if not dates or prices.height == 0:
        return compute_statistics(prices.select(INPUT_COLUMNS).clear(), universe_of).select(STATISTICS_COLUMNS)
    window = trailing_window(prices, dates[0], tail)
    stats = compute_statistics(window, universe_of)
    return stats.filter(pl.col("date").is_in(dates)).select(STATISTICS_COLUMNS).sort("ticker", "date")
