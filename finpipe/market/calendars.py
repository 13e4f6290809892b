"""Exchange trading calendars (offline, from ``exchange-calendars``).

A calendar answers "which dates were trading sessions", which turns an empty download into a
failure (sessions were expected) or into a quiet day (weekend, holiday, before listing).
Dates beyond a calendar's known horizon raise instead of guessing.
"""

from __future__ import annotations

import datetime as dt
from functools import lru_cache

# Earliest date any finpipe universe needs; exchange-calendars starts some calendars later by default.
CALENDAR_START = dt.date(1998, 1, 2)  # XBOM records holidays from 1997 only

SUPPORTED_CALENDARS = ("XNYS", "XBOM")


class CalendarHorizonError(ValueError):
    """A date lies outside the range a trading calendar knows holidays for."""


@lru_cache(maxsize=8)
def _calendar(code: str):
    import exchange_calendars as xcals

    if code not in SUPPORTED_CALENDARS:
        raise ValueError(f"unknown exchange calendar {code!r}; supported: {', '.join(SUPPORTED_CALENDARS)}")
    return xcals.get_calendar(code, start=CALENDAR_START.isoformat())


def calendar_bounds(code: str) -> tuple[dt.date, dt.date]:
    cal = _calendar(code)
    return cal.first_session.date(), cal.last_session.date()


def sessions(code: str, start: dt.date, end: dt.date) -> list[dt.date]:
    """Trading sessions of calendar ``code`` within [start, end] (inclusive)."""
    if end < start:
        return []
    first, last = calendar_bounds(code)
    if start < first or end > last:
        raise CalendarHorizonError(
            f"{code} calendar covers {first}..{last}; requested {start}..{end} lies outside it"
        )
    import pandas as pd  # here: `finpipe runs` and `sql` reach this module and need no pandas

    idx = _calendar(code).sessions_in_range(pd.Timestamp(start), pd.Timestamp(end))
    return [ts.date() for ts in idx]


def sessions_between_exclusive(code: str, after: dt.date, until: dt.date) -> int:
    """Number of sessions in (after, until]: how many sessions a series ending at ``after`` lags ``until``."""
    if until <= after:
        return 0
    return len(sessions(code, after + dt.timedelta(days=1), until))
