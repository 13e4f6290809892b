"""Offline replay of real daily prices shipped inside the ``bokeh-sampledata`` package.

The data is Quandl WIKI prices (declared public domain): AAPL, IBM, MSFT 2000-03-01..2013-03-01,
GOOG from 2004-08-19, FB from 2012-05-18. Open/high/low/close/volume are unadjusted, ``adj_close``
is split- and dividend-adjusted - the same convention the Yahoo source stores.
Replaying "as of" a date serves nothing after it, so a nightly cycle can be simulated day by day.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import polars as pl

from finpipe.market.schema import PRICE_COLUMNS
from finpipe.market.sources.base import FetchResult, SourceError

REPLAY_FIRST_DATE = dt.date(2000, 3, 1)
REPLAY_LAST_DATE = dt.date(2013, 3, 1)


def _data_file() -> Path:
    # Locate the file without importing the package (its import is not needed and pulls pandas in).
    spec = importlib.util.find_spec("bokeh_sampledata")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("the offline replay source needs the 'bokeh-sampledata' package: pip install bokeh-sampledata")
    path = Path(spec.submodule_search_locations[0]) / "_data" / "stocks.csv.gz"
    if not path.exists():
        raise SourceError(f"bokeh-sampledata is installed but {path} is missing")
    return path


@lru_cache(maxsize=1)
def load_replay_table() -> pl.DataFrame:
    raw = pl.read_csv(_data_file())
    return raw.select(
        ticker=pl.col("Ticker"),
        date=pl.col("Date").str.to_date("%Y-%m-%d"),
        open=pl.col("Open"),
        high=pl.col("High"),
        low=pl.col("Low"),
        close=pl.col("Close"),
        adj_close=pl.col("Adj Close"),
        volume=pl.col("Volume").cast(pl.Float64),
    ).sort("ticker", "date")


class ReplaySource:
    name = "replay:bokeh-sampledata"
    simulated = False

    def __init__(self, as_of: dt.date = REPLAY_LAST_DATE) -> None:
        self.as_of = as_of

    def available_until(self) -> dt.date:
        return min(self.as_of, REPLAY_LAST_DATE)

    def fetch(self, tickers: Sequence[str], start: dt.date, end: dt.date) -> FetchResult:
        table = load_replay_table()
        known = set(table["ticker"].unique().to_list())
        failures = {
            t: f"not in the offline replay data (it has {', '.join(sorted(known))}); use source 'yahoo' for it"
            for t in tickers
            if t not in known
        }
        last = min(end, self.available_until())
        frame = table.filter(
            pl.col("ticker").is_in([t for t in tickers if t in known]),
            pl.col("date").is_between(start, last),
        ).with_columns(source=pl.lit(self.name))
        return FetchResult(frame=frame.select(list(PRICE_COLUMNS)), failures=failures)
