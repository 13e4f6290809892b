"""Quality rules for the clean price table, evaluated in the lake (the Dagster checks call these).

Each rule returns a ``RuleResult`` with a pass flag, a one-line summary and details for metadata.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import duckdb

from finpipe.market import calendars


@dataclass
class RuleResult:
    passed: bool
    summary: str
    details: dict = field(default_factory=dict)


def unique_keys(con: duckdb.DuckDBPyConnection) -> RuleResult:
    (dupes,) = con.execute(
        "SELECT count(*) FROM (SELECT ticker, date FROM prices GROUP BY ALL HAVING count(*) > 1)"
    ).fetchall()[0]
    (nulls,) = con.execute("SELECT count(*) FROM prices WHERE ticker IS NULL OR date IS NULL").fetchall()[0]
    return RuleResult(dupes == 0 and nulls == 0, f"{dupes} duplicated (ticker, date) keys, {nulls} null keys",
                      {"duplicate_keys": dupes, "null_keys": nulls})


def ohlc_consistent(con: duckdb.DuckDBPyConnection, tolerance: float = 1e-6) -> RuleResult:
    bad = con.execute(
        """
        SELECT ticker, date::VARCHAR AS date, open, high, low, close, volume FROM prices
        WHERE NOT (high >= low AND greatest(open, close) <= high * (1 + ?) AND least(open, close) * (1 + ?) >= low
                   AND least(open, high, low, close, adj_close) > 0 AND volume >= 0)
           OR isnan(open + high + low + close + adj_close)
        ORDER BY ticker, date
        """,
        [tolerance, tolerance],
    ).fetchall()
    return RuleResult(not bad, f"{len(bad)} rows violate OHLC/volume consistency",
                      {"violations": len(bad), "examples": [list(map(str, r)) for r in bad[:5]]})


def _ticker_spans(con) -> list[tuple[str, str, dt.date, dt.date, int]]:
    return con.execute(
        """
        SELECT p.ticker, coalesce(i.calendar, 'XNYS'), min(p.date), max(p.date), count(*)
        FROM prices p LEFT JOIN instruments i USING (ticker)
        GROUP BY ALL ORDER BY 1
        """
    ).fetchall()


def calendar_gaps(con: duckdb.DuckDBPyConnection, max_missing_fraction: float = 0.01) -> RuleResult:
    """Per ticker, sessions of its exchange calendar between its first and last row that have no row."""
    per_ticker = {}
    worst = 0.0
    for ticker, cal, first, last, _rows in _ticker_spans(con):
        expected = set(calendars.sessions(cal, first, last))
        present = {r[0] for r in con.execute("SELECT date FROM prices WHERE ticker = ?", [ticker]).fetchall()}
        missing = sorted(expected - present)
        frac = len(missing) / max(len(expected), 1)
        worst = max(worst, frac)
        per_ticker[ticker] = {"expected": len(expected), "missing": len(missing),
                              "first_missing": [d.isoformat() for d in missing[:5]]}
    passed = worst <= max_missing_fraction
    return RuleResult(passed, f"worst ticker misses {worst:.2%} of its calendar sessions "
                      f"(threshold {max_missing_fraction:.2%})", per_ticker)


def freshness(con: duckdb.DuckDBPyConnection, max_lag_sessions: int = 3) -> RuleResult:
    """Every ticker's latest row is within ``max_lag_sessions`` sessions of the lake's latest date.

    Measured against the lake's own newest date rather than the wall clock, so that a replay lake
    "as of" 2013 is judged like a live one.
    """
    spans = _ticker_spans(con)
    if not spans:
        return RuleResult(False, "the prices table is empty", {})
    newest = max(last for *_, last, _n in spans)
    lags = {ticker: calendars.sessions_between_exclusive(cal, last, newest) for ticker, cal, _f, last, _n in spans}
    stale = {t: lag for t, lag in lags.items() if lag > max_lag_sessions}
    return RuleResult(not stale, f"{len(stale)} ticker(s) lag the newest date {newest} by more than "
                      f"{max_lag_sessions} sessions", {"newest_date": newest.isoformat(), "lag_sessions": lags})
