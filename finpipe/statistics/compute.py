"""Vectorized computation of the statistics defined in ``finpipe.statistics.definitions``."""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from finpipe.statistics.definitions import (
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
