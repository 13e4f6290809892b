"""Offline sources, universes, calendars and configuration validation."""

import datetime as dt

import pydantic
import pytest

from finpipe.market import calendars
from finpipe.market.ingest import FAILED, NO_SESSIONS, OK, IngestRequest, ingest
from finpipe.market.sources import ReplaySource, SimulatedSource, make_source
from finpipe.market.universes import INDIA, US_CORE, get_universe
from finpipe_tests.helpers import d


def test_replay_serves_real_quandl_rows():
    frame = ReplaySource().fetch(["AAPL", "IBM"], d("2000-03-01"), d("2000-03-02")).frame
    aapl = frame.filter(ticker="AAPL").sort("date").row(0, named=True)
    # first row of bokeh-sampledata's stocks.csv.gz (Quandl WIKI, unadjusted OHLCV + adjusted close)
    assert (aapl["open"], aapl["high"], aapl["low"], aapl["close"], aapl["volume"]) == (118.56, 132.06, 118.5, 130.31, 9616100)
    assert aapl["adj_close"] == pytest.approx(4.186663)
    assert frame.height == 4 and set(frame["source"]) == {"replay:bokeh-sampledata"}


def test_replay_as_of_hides_later_days_and_fails_beyond_it():
    source = ReplaySource(as_of=d("2013-02-27"))
    batch = ingest(source, IngestRequest(US_CORE, d("2013-02-25"), d("2013-03-01")))
    assert batch.clean["date"].max() == d("2013-02-27")
    assert {o.status for o in batch.outcomes} == {OK}  # sessions after as-of are not expected
    later = ingest(source, IngestRequest(US_CORE, d("2013-02-28"), d("2013-03-01")))
    assert {o.status for o in later.outcomes} == {FAILED}
    assert "serves data up to 2013-02-27" in later.outcomes[0].reason


def test_replay_fails_unknown_ticker_and_keeps_the_others():
    result = ReplaySource().fetch(["AAPL", "TSLA"], d("2013-02-25"), d("2013-03-01"))
    assert set(result.frame["ticker"]) == {"AAPL"}
    assert "not in the offline replay data" in result.failures["TSLA"]


def test_ingest_distinguishes_quiet_days_from_failures():
    # 2013-02-18 was Presidents' Day (NYSE closed); GOOG listed 2004-08-19.
    holiday = ingest(ReplaySource(), IngestRequest(US_CORE, d("2013-02-16"), d("2013-02-18")))
    assert {o.status for o in holiday.outcomes} == {NO_SESSIONS} and holiday.clean.height == 0
    before_listing = ingest(ReplaySource(), IngestRequest(US_CORE, d("2004-08-02"), d("2004-08-06")))
    status = {o.ticker: o.status for o in before_listing.outcomes}
    assert status == {"AAPL": OK, "MSFT": OK, "IBM": OK, "GOOG": NO_SESSIONS}


def test_simulated_source_is_seeded_calendar_aware_and_range_invariant():
    source = SimulatedSource(calendar="XBOM", seed=7)
    full = source.fetch(["^NSEI"], d("2024-01-01"), d("2024-12-31")).frame
    assert full["date"].to_list() == calendars.sessions("XBOM", d("2024-01-01"), d("2024-12-31"))
    assert full.height == 245  # BSE sessions in 2024 (exchange-calendars 4.13)
    part = source.fetch(["^NSEI"], d("2024-06-03"), d("2024-06-07")).frame
    assert part.rows() == full.filter(full["date"].is_between(d("2024-06-03"), d("2024-06-07"))).rows()
    other_seed = SimulatedSource(calendar="XBOM", seed=8).fetch(["^NSEI"], d("2024-06-03"), d("2024-06-07")).frame
    assert other_seed["close"].to_list() != part["close"].to_list()
    assert set(full["source"]) == {"simulated"} and source.simulated


def test_india_universe_has_the_indices_gold_etf_and_large_caps():
    symbols = set(INDIA.symbols)
    assert {"^NSEI", "^BSESN", "^NSEBANK", "^NSEMDCP50", "GOLDBEES.NS"} <= symbols
    assert {"TCS.NS", "RELIANCE.NS", "HDFCBANK.NS", "INFY.NS", "ICICIBANK.NS"} <= symbols
    assert INDIA.calendar == "XBOM"


def test_unknown_universe_and_source_are_clear_errors():
    from finpipe.defs.resources import MarketDataResource

    with pytest.raises(ValueError, match="unknown universe 'mars'; known universes: india, us_core, us_large_cap"):
        get_universe("mars")
    with pytest.raises(pydantic.ValidationError, match="unknown universe 'mars'"):
        MarketDataResource(universe="mars")
    with pytest.raises(pydantic.ValidationError, match="unknown price source 'bloomberg'"):
        MarketDataResource(source="bloomberg")
    with pytest.raises(pydantic.ValidationError, match="replay_as_of must be an ISO date"):
        MarketDataResource(replay_as_of="yesterday")
    with pytest.raises(ValueError, match="unknown price source"):
        make_source("bloomberg", calendar="XNYS")


def test_end_before_start_is_a_clear_error():
    with pytest.raises(ValueError, match="end date 2024-01-01 is before start date 2024-02-01"):
        IngestRequest(US_CORE, d("2024-02-01"), d("2024-01-01"))


def test_calendar_horizon_is_guarded():
    last = calendars.calendar_bounds("XBOM")[1]
    with pytest.raises(calendars.CalendarHorizonError, match="XBOM calendar covers"):
        calendars.sessions("XBOM", last, last + dt.timedelta(days=30))
