"""Ticker universes as configuration.

Symbols are Yahoo Finance symbols. ``listed`` marks the first session a ticker can have data for,
so that a quiet pre-listing range is not mistaken for a failed download.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


@dataclass(frozen=True)
class Ticker:
    symbol: str
    name: str
    kind: str  # "equity" | "index" | "etf"
    listed: dt.date | None = None


@dataclass(frozen=True)
class Universe:
    name: str
    description: str
    calendar: str  # exchange-calendars code
    tickers: tuple[Ticker, ...]

    @property
    def symbols(self) -> list[str]:
        return [t.symbol for t in self.tickers]

    def restricted_to(self, symbols: list[str]) -> "Universe":
        """This universe with exactly ``symbols``; symbols it lacks trade on its calendar."""
        known = {t.symbol: t for t in self.tickers}
        chosen = tuple(known.get(s, Ticker(s, s, "equity")) for s in dict.fromkeys(symbols))
        return Universe(self.name, f"{self.description} (restricted to {', '.join(symbols)})", self.calendar, chosen)

    def ticker(self, symbol: str) -> Ticker:
        for t in self.tickers:
            if t.symbol == symbol:
                return t
        raise KeyError(f"{symbol!r} is not in universe {self.name!r}")


US_CORE = Universe(
    name="us_core",
    description="US large caps with real daily history shipped offline (bokeh-sampledata, 2000-2013).",
    calendar="XNYS",
    tickers=(
        Ticker("AAPL", "Apple Inc.", "equity"),
        Ticker("MSFT", "Microsoft Corp.", "equity"),
        Ticker("IBM", "International Business Machines", "equity"),
        Ticker("GOOG", "Alphabet Inc. (Google)", "equity", listed=dt.date(2004, 8, 19)),
    ),
)

US_LARGE_CAP = Universe(
    name="us_large_cap",
    description="US mega caps for live Yahoo runs.",
    calendar="XNYS",
    tickers=(
        Ticker("AAPL", "Apple Inc.", "equity"),
        Ticker("MSFT", "Microsoft Corp.", "equity"),
        Ticker("GOOG", "Alphabet Inc. class C", "equity", listed=dt.date(2004, 8, 19)),
        Ticker("AMZN", "Amazon.com Inc.", "equity"),
        Ticker("META", "Meta Platforms Inc.", "equity", listed=dt.date(2012, 5, 18)),
        Ticker("NVDA", "NVIDIA Corp.", "equity"),
        Ticker("JPM", "JPMorgan Chase & Co.", "equity"),
        Ticker("IBM", "International Business Machines", "equity"),
    ),
)

INDIA = Universe(
    name="india",
    description="Indian indices, a gold ETF and large caps (NSE/BSE; BSE trading calendar).",
    calendar="XBOM",
    tickers=(
        Ticker("^NSEI", "NIFTY 50", "index", listed=dt.date(2007, 9, 17)),
        Ticker("^BSESN", "S&P BSE SENSEX", "index"),
        Ticker("^NSEBANK", "NIFTY Bank", "index", listed=dt.date(2007, 9, 17)),
        Ticker("^NSEMDCP50", "NIFTY Midcap 50", "index", listed=dt.date(2007, 9, 24)),
        Ticker("GOLDBEES.NS", "Nippon India ETF Gold BeES", "etf", listed=dt.date(2007, 3, 19)),
        Ticker("TCS.NS", "Tata Consultancy Services", "equity", listed=dt.date(2004, 8, 25)),
        Ticker("RELIANCE.NS", "Reliance Industries", "equity"),
        Ticker("HDFCBANK.NS", "HDFC Bank", "equity"),
        Ticker("INFY.NS", "Infosys", "equity"),
        Ticker("ICICIBANK.NS", "ICICI Bank", "equity"),
    ),
)

UNIVERSES: dict[str, Universe] = {u.name: u for u in (US_CORE, US_LARGE_CAP, INDIA)}


def get_universe(name: str) -> Universe:
    try:
        return UNIVERSES[name]
    except KeyError:
        raise ValueError(f"unknown universe {name!r}; known universes: {', '.join(sorted(UNIVERSES))}") from None
