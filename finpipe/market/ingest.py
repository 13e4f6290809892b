"""One ingestion step: fetch a date range for a universe, judge completeness, validate rows.

The result is written to the lake in one transaction by ``PriceLake.write_batch``; nothing here
touches the lake, so a failure before that point cannot leave anything half-written.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import polars as pl

from finpipe.market import calendars
from finpipe.market.schema import ValidatedPrices, validate_prices
from finpipe.market.sources.base import PriceSource
from finpipe.market.universes import Universe

# Per-ticker outcome statuses
OK = "ok"  # every expected session arrived clean
INCOMPLETE = "incomplete"  # rows arrived, some expected sessions did not (written; the gap check judges)
FAILED = "failed"  # nothing usable arrived although sessions were expected
NO_SESSIONS = "no_sessions"  # nothing expected: weekend, holiday, before listing


@dataclass(frozen=True)
class IngestRequest:
    universe: Universe
    start: dt.date
    end: dt.date

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError(f"end date {self.end} is before start date {self.start}")


@dataclass(frozen=True)
class TickerOutcome:
    ticker: str
    status: str
    expected_sessions: int
    rows: int = 0
    rejected: int = 0
    missing_sessions: int = 0
    reason: str = ""


@dataclass
class IngestBatch:
    request: IngestRequest
    source_name: str
    simulated: bool
    clean: pl.DataFrame
    rejects: pl.DataFrame
    outcomes: list[TickerOutcome] = field(default_factory=list)

    @property
    def failures(self) -> dict[str, str]:
        return {o.ticker: o.reason for o in self.outcomes if o.status == FAILED}


def expected_sessions(request: IngestRequest, available_until: dt.date | None) -> dict[str, list[dt.date]]:
    last = request.end if available_until is None else min(request.end, available_until)
    out: dict[str, list[dt.date]] = {}
    for t in request.universe.tickers:
        first = max(request.start, t.listed) if t.listed else request.start
        out[t.symbol] = calendars.sessions(request.universe.calendar, first, last)
    return out


def ingest(source: PriceSource, request: IngestRequest) -> IngestBatch:
    available_until = source.available_until()
    expected = expected_sessions(request, available_until)
    outcomes: dict[str, TickerOutcome] = {}

    beyond_source = available_until is not None and request.start > available_until
    to_fetch = []
    for ticker, days in expected.items():
        if beyond_source:
            outcomes[ticker] = TickerOutcome(
                ticker, FAILED, 0, reason=f"source {source.name} serves data up to {available_until} only; "
                f"requested {request.start}..{request.end}",
            )
        elif not days:
            outcomes[ticker] = TickerOutcome(ticker, NO_SESSIONS, 0)
        else:
            to_fetch.append(ticker)

    validated = ValidatedPrices(clean=pl.DataFrame(), rejects=pl.DataFrame())
    if to_fetch:
        result = source.fetch(to_fetch, request.start, request.end)
        # A source must not hand back rows for tickers it was not asked for, nor outside the range.
        frame = result.frame.filter(pl.col("ticker").is_in(to_fetch))
        validated = validate_prices(frame)
        clean_counts = dict(validated.clean.group_by("ticker").len().iter_rows())
        reject_counts = dict(validated.rejects.group_by("ticker").len().iter_rows()) if validated.rejects.height else {}
        clean_dates = {
            t: set(ds) for t, ds in validated.clean.group_by("ticker").agg(pl.col("date")).iter_rows()
        }
        for ticker in to_fetch:
            n_expected = len(expected[ticker])
            rows = clean_counts.get(ticker, 0)
            rejected = reject_counts.get(ticker, 0)
            if ticker in result.failures or rows == 0:
                reason = result.failures.get(ticker) or (
                    f"all {rejected} rows rejected" if rejected else f"empty result: {n_expected} sessions expected"
                )
                outcomes[ticker] = TickerOutcome(ticker, FAILED, n_expected, 0, rejected, n_expected, reason)
                continue
            missing = len(set(expected[ticker]) - clean_dates.get(ticker, set()))
            status = INCOMPLETE if missing else OK
            reason = f"{missing} of {n_expected} expected sessions missing" if missing else ""
            outcomes[ticker] = TickerOutcome(ticker, status, n_expected, rows, rejected, missing, reason)

    failed = {t for t, o in outcomes.items() if o.status == FAILED}
    clean = validated.clean.filter(~pl.col("ticker").is_in(list(failed))) if validated.clean.height else validated.clean
    return IngestBatch(
        request=request,
        source_name=source.name,
        simulated=source.simulated,
        clean=clean,
        rejects=validated.rejects,
        outcomes=[outcomes[t] for t in request.universe.symbols],
    )
