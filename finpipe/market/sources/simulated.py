"""A seeded, calendar-aware simulated price source, for tickers no offline real data covers.

Rows are labelled ``source = "simulated"`` and the lake refuses to mix them with real rows of the
same ticker. Each ticker's path is generated from a fixed origin with a seed derived from
(seed, ticker), so any sub-range request returns exactly the same numbers (idempotent re-ingest).
The model is a geometric Brownian motion with intraday ranges and log-normal volume: it has the
shape of market data, not its information. Never train a model you care about on it.

A volatility shock is explicit and off by default: ``shock_from`` (a date) and ``shock_volatility`` (a multiplier of
the annual volatility from that session on, e.g. 4.0) scale the same random draws, so every session before the shock
is unchanged and a re-ingest stays idempotent. It exists to exercise drift-aware retraining
(``finpipe.statistics.drift``; the resource fields ``simulation_shock_from`` / ``simulation_shock_volatility``).
"""

from __future__ import annotations

import datetime as dt
import zlib
from typing import Sequence

import numpy as np
import polars as pl

from finpipe.market import calendars
from finpipe.market.schema import PRICE_COLUMNS
from finpipe.market.sources.base import FetchResult

SIMULATION_ORIGIN = dt.date(2000, 1, 3)
ANNUAL_DRIFT = 0.08
ANNUAL_VOLATILITY = 0.20
TRADING_DAYS_PER_YEAR = 252


class SimulatedSource:
    name = "simulated"
    simulated = True

    def __init__(self, calendar: str, seed: int = 7, shock_from: dt.date | None = None,
                 shock_volatility: float = 1.0) -> None:
        if not (np.isfinite(shock_volatility) and shock_volatility > 0):
            raise ValueError(f"shock_volatility must be a finite number > 0, got {shock_volatility}")
        self.calendar = calendar
        self.seed = seed
        self.shock_from = shock_from
        self.shock_volatility = shock_volatility

    def available_until(self) -> dt.date | None:
        return None

    def _path(self, ticker: str, end: dt.date) -> pl.DataFrame:
        days = calendars.sessions(self.calendar, SIMULATION_ORIGIN, end)
        # One independent stream per quantity: each stream's first k draws never depend on how many
        # sessions were requested, so any sub-range reproduces the full path exactly.
        base = [self.seed, zlib.crc32(ticker.encode())]
        stream = {name: np.random.default_rng(base + [i]) for i, name in
                  enumerate(("price0", "returns", "gaps", "upper", "lower", "volume"))}
        n = len(days)
        dt_year = 1.0 / TRADING_DAYS_PER_YEAR
        shocks = stream["returns"].standard_normal(n)
        volatility = np.full(n, ANNUAL_VOLATILITY)
        if self.shock_from is not None:  # the regime change: same draws, scaled from the shock's session on
            volatility[np.asarray([d >= self.shock_from for d in days], dtype=bool)] *= self.shock_volatility
        log_ret = (ANNUAL_DRIFT - 0.5 * volatility**2) * dt_year + volatility * np.sqrt(dt_year) * shocks
        start_price = float(stream["price0"].uniform(50, 5000))
        close = start_price * np.exp(np.cumsum(log_ret))
        prev_close = np.concatenate([[start_price], close[:-1]])
        open_ = prev_close * np.exp(stream["gaps"].normal(0.0, 0.003, n))
        high = np.maximum(open_, close) * (1 + np.abs(stream["upper"].normal(0.0, 0.006, n)))
        low = np.minimum(open_, close) * (1 - np.abs(stream["lower"].normal(0.0, 0.006, n)))
        volume = np.round(stream["volume"].lognormal(mean=14.0, sigma=0.4, size=n))
        return pl.DataFrame(
            {
                "ticker": ticker,
                "date": days,
                "open": np.round(open_, 2),
                "high": np.round(high, 2),
                "low": np.round(low, 2),
                "close": np.round(close, 2),
                "adj_close": np.round(close, 2),
                "volume": volume,
                "source": self.name,
            }
        ).with_columns(
            # rounding may push open/close a cent past high/low: keep the bar consistent
            high=pl.max_horizontal("open", "high", "close"),
            low=pl.min_horizontal("open", "low", "close"),
        )

    def fetch(self, tickers: Sequence[str], start: dt.date, end: dt.date) -> FetchResult:
        frames = [self._path(t, end).filter(pl.col("date") >= start) for t in tickers]
        frame = pl.concat(frames) if frames else pl.DataFrame(schema=PRICE_COLUMNS)
        return FetchResult(frame=frame.select(list(PRICE_COLUMNS)))
