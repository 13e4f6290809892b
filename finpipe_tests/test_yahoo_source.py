"""The Yahoo source, with the network faked at its boundary: ``yfinance.download`` serves a recorded frame.

The recorded frame has the layout ``yf.download(..., auto_adjust=False, group_by='column')`` returns in
yfinance 1.x: columns MultiIndex (Price, Ticker), a ``Date`` index, a failed ticker's columns all NaN.
Its numbers are the real AAPL/MSFT bars of 2013-02-25..2013-03-01.
"""

import socket
import threading
import time

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yfinance

from finpipe.defs.market_data import daily_prices
from finpipe.market.ingest import FAILED, OK, IngestRequest, ingest
from finpipe.market.sources.yahoo import YahooSource, capped_timeout_session, parse_download
from finpipe.market.universes import US_CORE
from finpipe.paths import LAKE_DB_NAME
from finpipe_tests.helpers import FakeYahoo, d, query, recorded_frame, run_yahoo

UNIVERSE = US_CORE.restricted_to(["AAPL", "MSFT", "DEAD"])

def source(fake, **kwargs) -> YahooSource:
    delays: list[float] = []
    src = YahooSource(downloader=fake, session_factory=None, sleep=delays.append, **kwargs)
    src.delays = delays
    return src


def test_parses_a_recorded_multi_ticker_frame_into_the_canonical_schema():
    rows, failures = parse_download(recorded_frame(), ["AAPL", "MSFT", "DEAD", "GONE"], "yahoo")
    assert failures == {"DEAD": "empty download (no rows)", "GONE": "ticker absent from the download"}
    assert rows.columns == ["ticker", "date", "open", "high", "low", "close", "adj_close", "volume", "source"]
    assert rows.height == 10
    aapl = rows.filter(ticker="AAPL", date=d("2013-03-01")).row(0, named=True)
    assert (aapl["open"], aapl["high"], aapl["low"], aapl["close"], aapl["volume"]) == \
        (438.0, 438.1799, 429.98, 430.47, 19730300.0)
    assert aapl["adj_close"] == pytest.approx(56.1373531)


def test_frame_downloaded_with_auto_adjust_is_refused_with_a_reason():
    adjusted = recorded_frame().drop(columns="Adj Close", level=0)
    with pytest.raises(ValueError, match="auto_adjust=False"):
        parse_download(adjusted, ["AAPL"], "yahoo")


def test_download_request_is_explicit_and_end_inclusive():
    fake = FakeYahoo()
    source(fake).fetch(["AAPL", "MSFT"], d("2013-02-25"), d("2013-03-01"))
    call = fake.calls[0]
    assert call["start"] == "2013-02-25" and call["end"] == "2013-03-02"  # yfinance's end is exclusive
    assert call["auto_adjust"] is False and call["group_by"] == "column" and call["progress"] is False
    assert call["timeout"] == 10.0


def test_failed_ticker_is_retried_with_backoff_then_reported_and_others_kept():
    fake = FakeYahoo()
    src = source(fake, max_attempts=3, backoff_s=2.0)
    batch = ingest(src, IngestRequest(UNIVERSE, d("2013-02-25"), d("2013-03-01")))
    status = {o.ticker: o.status for o in batch.outcomes}
    assert status == {"AAPL": OK, "MSFT": OK, "DEAD": FAILED}
    assert [c["tickers"] for c in fake.calls] == [["AAPL", "MSFT", "DEAD"], ["DEAD"], ["DEAD"]]
    assert src.delays == [2.0, 4.0]
    assert "empty download" in batch.failures["DEAD"] and "after 3 attempts" in batch.failures["DEAD"]
    assert "possibly delisted; no timezone found" in batch.failures["DEAD"]  # yfinance's own reason, from its log
    assert batch.clean.height == 10


def test_transient_network_error_recovers_on_retry():
    fake = FakeYahoo(fail_first=1)
    batch = ingest(source(fake, max_attempts=2, backoff_s=0.5), IngestRequest(UNIVERSE, d("2013-02-25"), d("2013-03-01")))
    assert {o.ticker: o.status for o in batch.outcomes} == {"AAPL": OK, "MSFT": OK, "DEAD": FAILED}
    assert len(fake.calls) == 2


def test_persistent_network_error_fails_every_ticker_with_the_error():
    fake = FakeYahoo(error=ConnectionError("Could not resolve host: query2.finance.yahoo.com"))
    batch = ingest(source(fake, max_attempts=2), IngestRequest(UNIVERSE, d("2013-02-25"), d("2013-03-01")))
    assert {o.status for o in batch.outcomes} == {FAILED}
    assert "ConnectionError: Could not resolve host" in batch.failures["AAPL"]
    assert batch.clean.height == 0


def test_session_caps_every_request_timeout(monkeypatch):
    from curl_cffi import requests as curl_requests

    seen = []
    monkeypatch.setattr(curl_requests.Session, "request", lambda self, method, url, *a, **kw: seen.append(kw["timeout"]))
    session = capped_timeout_session(5.0)
    session.request("GET", "https://fc.yahoo.com")  # yfinance's cookie fetch passes no timeout
    session.request("GET", "https://query2.finance.yahoo.com/v8/finance/chart/AAPL", timeout=30)
    session.request("GET", "https://query2.finance.yahoo.com/v8/finance/chart/MSFT", timeout=2)
    assert seen == [5.0, 5.0, 2.0]


@pytest.fixture
def black_hole_proxy():
    """A local proxy that accepts connections and never answers: a network that swallows packets."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_real_yfinance_against_a_silent_network_fails_fast(black_hole_proxy, tmp_path):
    """No fake here: yfinance's own code and curl, talking to a proxy that never answers."""
    yfinance.set_tz_cache_location(str(tmp_path / "yf-cache"))
    src = YahooSource(timeout_s=1.0, max_attempts=3, backoff_s=0.1, deadline_s=4.0, proxy=black_hole_proxy)
    started = time.monotonic()
    result = src.fetch(["AAPL", "MSFT"], d("2013-02-25"), d("2013-03-01"))
    elapsed = time.monotonic() - started
    assert set(result.failures) == {"AAPL", "MSFT"} and result.frame.height == 0
    assert "no answer within the 4s deadline" in result.failures["AAPL"]
    assert elapsed < 6, f"took {elapsed:.1f}s: the 4 s deadline did not hold"


# ---------------------------------------------------------------- through Dagster


def test_failed_ticker_leaves_the_others_written_and_the_failure_in_metadata(lake_resources, isolated_lake, monkeypatch):
    result = run_yahoo(lake_resources, monkeypatch, FakeYahoo())
    assert result.success
    meta = result.asset_materializations_for_node("daily_prices")[0].metadata
    assert meta["tickers_ok"].value == ["AAPL", "MSFT"]
    assert list(meta["tickers_failed"].value) == ["DEAD"]
    assert "empty download" in meta["tickers_failed"].value["DEAD"]
    assert query(isolated_lake, "SELECT ticker, count(*) FROM prices GROUP BY ALL ORDER BY 1") == [("AAPL", 5), ("MSFT", 5)]
    assert query(isolated_lake, "SELECT DISTINCT source FROM prices") == [("yahoo",)]
    assert query(isolated_lake, "SELECT status FROM ingest_log WHERE ticker = 'DEAD'") == [("failed",)]


def test_network_down_fails_the_run_clearly_and_writes_nothing(lake_resources, isolated_lake, monkeypatch):
    # What yf.download really does offline: prints the DNS error and returns an empty frame.
    empty = pd.DataFrame(columns=pd.MultiIndex.from_tuples([], names=["Price", "Ticker"]))
    result = run_yahoo(lake_resources, monkeypatch, FakeYahoo(frame=empty))
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "every ticker failed from source yahoo" in failure.event_specific_data.error.message
    assert not (isolated_lake / LAKE_DB_NAME).exists()


def test_the_network_edge_has_a_retry_policy_with_backoff():
    policy = daily_prices.op.retry_policy
    assert policy.max_retries == 2 and policy.backoff == dg.Backoff.EXPONENTIAL and policy.delay > 0


def test_corrupt_rows_from_the_wire_land_in_rejects_with_reasons(lake_resources, isolated_lake, monkeypatch):
    frame = recorded_frame()
    frame.loc["2013-02-25", ("Close", "AAPL")] = np.nan
    frame.loc["2013-02-26", ("Low", "AAPL")] = 500.0  # above the high
    frame.loc["2013-02-27", ("Volume", "MSFT")] = -100.0
    frame.loc["2013-02-28", ("Open", "MSFT")] = -27.0
    result = run_yahoo(lake_resources, monkeypatch, FakeYahoo(frame=frame))
    # the materialization succeeds; the rejected rows leave holes that the blocking gap check reports
    assert result.asset_materializations_for_node("daily_prices")[0].metadata["rows_rejected"].value == 4
    failed_checks = [c.check_name for c in result.get_asset_check_evaluations() if not c.passed]
    assert failed_checks == ["prices_no_calendar_gaps"]
    rejects = query(isolated_lake, "SELECT ticker, date::VARCHAR, reason FROM price_rejects ORDER BY date")
    assert rejects == [
        ("AAPL", "2013-02-25", "missing price (NaN/null)"),
        ("AAPL", "2013-02-26", "high below low; open/close outside high-low range"),
        ("MSFT", "2013-02-27", "negative volume"),
        ("MSFT", "2013-02-28", "non-positive price; open/close outside high-low range"),
    ]
    assert query(isolated_lake, "SELECT count(*) FROM prices") == [(6,)]
    # the same bad download again: rejects are recorded once, not twice
    run_yahoo(lake_resources, monkeypatch, FakeYahoo(frame=frame))
    assert query(isolated_lake, "SELECT count(*) FROM price_rejects") == [(4,)]
