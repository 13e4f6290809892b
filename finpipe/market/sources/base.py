"""The price source interface every source (live, replay, simulated) implements."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import polars as pl


class SourceError(RuntimeError):
    """A source could not serve a request at all (as opposed to failing single tickers)."""


@dataclass
class FetchResult:
    """Rows in the canonical price schema, plus the tickers that failed and why."""

    frame: pl.DataFrame
    failures: dict[str, str] = field(default_factory=dict)


class PriceSource(Protocol):
    #: recorded in every lake row's ``source`` column
    name: str
    #: simulated rows must never mix with real ones for the same ticker
    simulated: bool

    def available_until(self) -> dt.date | None:
        """Last date this source can serve (a replay's as-of date), or None for 'up to today'."""
        ...

    def fetch(self, tickers: Sequence[str], start: dt.date, end: dt.date) -> FetchResult:
        """Daily bars for ``tickers`` with start <= date <= end (inclusive)."""
        ...
