"""Price sources behind one interface, chosen by explicit configuration (never a silent fallback)."""

from __future__ import annotations

import datetime as dt

from finpipe.market.sources.base import FetchResult, PriceSource, SourceError
from finpipe.market.sources.replay import REPLAY_LAST_DATE, ReplaySource
from finpipe.market.sources.simulated import SimulatedSource
from finpipe.market.sources.yahoo import YahooSource

SOURCE_KINDS = ("replay", "yahoo", "simulated")

__all__ = [
    "FetchResult", "PriceSource", "SourceError", "ReplaySource", "SimulatedSource", "YahooSource",
    "SOURCE_KINDS", "make_source", "REPLAY_LAST_DATE",
]


def make_source(
    kind: str,
    *,
    calendar: str,
    replay_as_of: dt.date = REPLAY_LAST_DATE,
    simulation_seed: int = 7,
    simulation_shock_from: dt.date | None = None,
    simulation_shock_volatility: float = 1.0,
    yahoo_timeout_s: float = 10.0,
    yahoo_max_attempts: int = 3,
    yahoo_backoff_s: float = 2.0,
    yahoo_proxy: str | None = None,
    yahoo_deadline_s: float = 90.0,
) -> PriceSource:
    if kind == "replay":
        return ReplaySource(as_of=replay_as_of)
    if kind == "simulated":
        return SimulatedSource(calendar=calendar, seed=simulation_seed, shock_from=simulation_shock_from,
                               shock_volatility=simulation_shock_volatility)
    if kind == "yahoo":
        return YahooSource(timeout_s=yahoo_timeout_s, max_attempts=yahoo_max_attempts, backoff_s=yahoo_backoff_s,
                           deadline_s=yahoo_deadline_s, proxy=yahoo_proxy or None)
    raise ValueError(f"unknown price source {kind!r}; choose one of {', '.join(SOURCE_KINDS)}")
