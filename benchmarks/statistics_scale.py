"""Full recompute of the statistics for a large synthetic universe vs a straightforward pandas version.

    python -m benchmarks.statistics_scale [--tickers 500] [--years 10]

Prints a table (and writes benchmarks/results/statistics_scale.json): rows/s of finpipe's Polars
implementation, of a groupby/rolling pandas baseline computing the same columns (asserted equal),
and the time to write the result into a DuckDB lake. Same process, same data.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl

from finpipe.market.lake import PriceLake
from finpipe.statistics.compute import compute_statistics

COMPARED = ["ret_1d", "ret_5d", "ret_30d", "volatility_20d", "sma_20", "sma_50", "rsi_14", "high_52w", "low_52w",
            "avg_volume_20d"]


def synthetic_prices(tickers: int, sessions: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2010-01-04", periods=sessions).to_numpy().astype("datetime64[D]")
    log_ret = rng.normal(0.0003, 0.02, (tickers, sessions))
    close = 100 * np.exp(np.cumsum(log_ret, axis=1))
    return pl.DataFrame({
        "ticker": np.repeat([f"T{i:04d}" for i in range(tickers)], sessions),
        "date": np.tile(dates, tickers),
        "close": close.ravel(),
        "adj_close": close.ravel(),
        "volume": rng.integers(1_000, 1_000_000, tickers * sessions),
    })


def pandas_baseline(prices: pd.DataFrame) -> pd.DataFrame:
    """What one would write by hand: groupby + rolling per statistic."""
    df = prices.sort_values(["ticker", "date"]).copy()
    g = df.groupby("ticker")["adj_close"]
    for n in (1, 5, 30):
        df[f"ret_{n}d"] = g.pct_change(n)
    df["volatility_20d"] = df.groupby("ticker")["ret_1d"].transform(lambda s: s.rolling(20).std()) * np.sqrt(252)
    for n in (20, 50):
        df[f"sma_{n}"] = g.transform(lambda s, n=n: s.rolling(n).mean()) * df["close"] / df["adj_close"]
    df["high_52w"] = g.transform(lambda s: s.rolling(252).max())
    df["low_52w"] = g.transform(lambda s: s.rolling(252).min())
    df["avg_volume_20d"] = df.groupby("ticker")["volume"].transform(lambda s: s.rolling(20).mean())

    def rsi(s: pd.Series) -> pd.Series:
        change = s.diff()
        gain, loss = change.clip(lower=0), (-change).clip(lower=0)
        out = []
        ag = al = None
        for i in range(len(s)):
            if i == 14:
                ag, al = gain.iloc[1:15].mean(), loss.iloc[1:15].mean()
            elif i > 14:
                ag = ag * 13 / 14 + gain.iloc[i] / 14
                al = al * 13 / 14 + loss.iloc[i] / 14
            out.append(np.nan if ag is None else (100.0 if al == 0 else 100 - 100 / (1 + ag / al)))
        return pd.Series(out, index=s.index)

    df["rsi_14"] = g.transform(rsi)
    return df


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tickers", type=int, default=500)
    parser.add_argument("--years", type=int, default=10)
    parser.add_argument("--baseline-tickers", type=int, default=50,
                        help="the pandas baseline runs on this many tickers (it is slow); rows/s are compared")
    args = parser.parse_args()
    sessions = 252 * args.years
    prices = synthetic_prices(args.tickers, sessions)
    rows = prices.height

    started = time.perf_counter()
    stats = compute_statistics(prices)
    finpipe_s = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as tmp:
        lake = PriceLake(Path(tmp) / "bench.duckdb")
        started = time.perf_counter()
        lake.replace_table("price_statistics", stats)
        write_s = time.perf_counter() - started

    subset = prices.filter(pl.col("ticker").is_in([f"T{i:04d}" for i in range(args.baseline_tickers)]))
    started = time.perf_counter()
    baseline = pandas_baseline(subset.to_pandas())
    baseline_s = time.perf_counter() - started
    ours = stats.filter(pl.col("ticker").is_in(subset["ticker"].unique().implode())).sort("ticker", "date").to_pandas()
    for col in COMPARED:
        np.testing.assert_allclose(ours[col].to_numpy(dtype=float), baseline[col].to_numpy(dtype=float),
                                   rtol=1e-9, atol=1e-9, equal_nan=True, err_msg=col)

    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}".strip(),
        "tickers": args.tickers, "sessions_per_ticker": sessions, "rows": rows,
        "finpipe_seconds": round(finpipe_s, 3), "finpipe_rows_per_s": round(rows / finpipe_s),
        "lake_write_seconds": round(write_s, 3),
        "pandas_baseline_rows": subset.height, "pandas_baseline_seconds": round(baseline_s, 3),
        "pandas_rows_per_s": round(subset.height / baseline_s),
        "speedup_rows_per_s": round((rows / finpipe_s) / (subset.height / baseline_s), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "equal_columns": COMPARED,
    }
    out = Path(__file__).parent / "results" / "statistics_scale.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    width = max(map(len, result))
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
