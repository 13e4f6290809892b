"""Live daily prices from Yahoo Finance through ``yfinance``.

Choices made deliberately:
- ``auto_adjust=False``: we keep the printed OHLC (what a trader saw) *and* Yahoo's split/dividend
  adjusted close in ``adj_close``; statistics use ``adj_close`` for returns. The offline replay
  source follows the same convention, so both feed one schema.
- One multi-ticker request per attempt; tickers that come back empty are retried with exponential
  backoff, then reported as failed - each ticker succeeds or fails on its own.
- ``yf.download`` does not raise when the network is down: it prints an error and returns an empty
  frame. An empty or missing ticker is therefore a failure of that ticker, never "no new data".
- Every HTTP request gets a bounded timeout (yfinance's own cookie/crumb calls would otherwise wait
  30 s each), and the whole fetch (all attempts) has a deadline: a network that silently drops packets
  fails within ``deadline_s`` instead of hanging for minutes.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import logging
import socket
import time
from typing import Any, Callable, Sequence

import polars as pl

from finpipe.market.schema import PRICE_COLUMNS
from finpipe.market.sources.base import FetchResult

log = logging.getLogger(__name__)

#: Yahoo column name -> canonical column name
YAHOO_COLUMNS = {
    "Open": "open",
    "High": "high",
    "Low": "low",
    "Close": "close",
    "Adj Close": "adj_close",
    "Volume": "volume",
}

Downloader = Callable[..., Any]  # the signature of yfinance.download


def capped_timeout_session(timeout_s: float, proxy: str | None = None):
    """A curl_cffi session (what yfinance >= 0.2.54 requires) whose every request has a bounded timeout."""
    from curl_cffi import requests as curl_requests

    class CappedTimeoutSession(curl_requests.Session):
        def request(self, method, url, *args, **kwargs):  # type: ignore[override]
            given = kwargs.get("timeout")
            kwargs["timeout"] = timeout_s if given is None else min(float(given), timeout_s)
            return super().request(method, url, *args, **kwargs)

    proxies = {"http": proxy, "https": proxy} if proxy else None
    return CappedTimeoutSession(impersonate="chrome", proxies=proxies)


def parse_download(frame: Any, tickers: Sequence[str], source_name: str) -> tuple[pl.DataFrame, dict[str, str]]:
    """Turn a ``yf.download(..., group_by='column', multi_level_index=True)`` frame into canonical rows.

    Returns (rows, {ticker: reason}) for tickers with no rows in the frame.
    """
    import pandas as pd

    failures: dict[str, str] = {}
    parts: list[pl.DataFrame] = []
    if frame is None or len(frame) == 0 or not isinstance(frame.columns, pd.MultiIndex):
        return pl.DataFrame(schema=PRICE_COLUMNS), {t: "empty download" for t in tickers}
    missing_cols = set(YAHOO_COLUMNS) - set(frame.columns.get_level_values(0))
    if missing_cols:
        raise ValueError(
            f"yfinance frame lacks {sorted(missing_cols)}: download with auto_adjust=False so 'Adj Close' is kept"
        )
    present = set(frame.columns.get_level_values(1))
    for ticker in tickers:
        if ticker not in present:
            failures[ticker] = "ticker absent from the download"
            continue
        sub = frame.xs(ticker, axis=1, level=1)[list(YAHOO_COLUMNS)].dropna(how="all")
        if sub.empty:
            failures[ticker] = "empty download (no rows)"
            continue
        index = pd.DatetimeIndex(sub.index)
        if index.tz is not None:
            index = index.tz_localize(None)
        parts.append(
            pl.DataFrame(
                {
                    "ticker": ticker,
                    "date": pl.Series(list(index.date), dtype=pl.Date),
                    **{canon: sub[col].to_numpy(dtype="float64") for col, canon in YAHOO_COLUMNS.items()},
                    "source": source_name,
                }
            )
        )
    rows = pl.concat(parts).select(list(PRICE_COLUMNS)) if parts else pl.DataFrame(schema=PRICE_COLUMNS)
    return rows, failures


class _CapturedErrors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().strip())

    def by_ticker(self, tickers: Sequence[str]) -> dict[str, str]:
        out = {}
        for ticker in tickers:
            hits = [m for m in self.messages if ticker in m]
            if hits:
                out[ticker] = hits[-1][:300]
        return out


YAHOO_HOST = "query2.finance.yahoo.com"


class YahooSource:
    name = "yahoo"
    simulated = False

    def __init__(
        self,
        timeout_s: float = 10.0,
        max_attempts: int = 3,
        backoff_s: float = 2.0,
        deadline_s: float = 90.0,
        downloader: Downloader | None = None,
        session_factory: Callable[..., Any] | None = capped_timeout_session,
        sleep: Callable[[float], None] = time.sleep,
        proxy: str | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        self.deadline_s = deadline_s
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self._downloader = downloader
        self._session_factory = session_factory
        self._sleep = sleep
        self.proxy = proxy
        self.attempts_made = 0
        self.offline: str | None = None  # set when the network is unreachable: retrying cannot help

    def available_until(self) -> dt.date | None:
        return None

    def _download(self, tickers: list[str], start: dt.date, end: dt.date) -> tuple[Any, dict[str, str]]:
        import yfinance as yf

        downloader = self._downloader or yf.download
        session = self._session_factory(self.timeout_s, self.proxy) if self._session_factory else None
        # yfinance reports per-ticker failures only through its logger (shared._ERRORS stays empty in 1.x)
        captured = _CapturedErrors()
        yf_log = logging.getLogger("yfinance")
        yf_log.addHandler(captured)
        try:
            frame = downloader(
                tickers,
                start=start.isoformat(),
                end=(end + dt.timedelta(days=1)).isoformat(),  # yfinance's end is exclusive
                interval="1d",
                auto_adjust=False,
                actions=False,
                group_by="column",
                multi_level_index=True,
                progress=False,
                threads=False,
                timeout=self.timeout_s,
                session=session,
            )
        finally:
            yf_log.removeHandler(captured)
        return frame, captured.by_ticker(tickers)

    def unreachable(self) -> str | None:
        """Why Yahoo cannot be reached at all (no DNS answer within seconds), or None. Only for the real client
        without a proxy: a proxy resolves names itself, and a test's downloader needs no network."""
        if self._downloader is not None or self.proxy:
            return None
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="yahoo-dns")
        try:
            future = pool.submit(socket.getaddrinfo, YAHOO_HOST, 443)
            future.result(timeout=min(5.0, self.deadline_s))
        except concurrent.futures.TimeoutError:
            return f"no network: no DNS answer for {YAHOO_HOST} within 5 s"
        except OSError as exc:
            return f"no network: cannot resolve {YAHOO_HOST} ({exc.strerror or exc})"
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return None

    def fetch(self, tickers: Sequence[str], start: dt.date, end: dt.date) -> FetchResult:
        pending = list(dict.fromkeys(tickers))
        offline = self.unreachable()
        if offline:  # fail in seconds with the real reason, not after every retry with "possibly delisted"
            self.offline = offline
            return FetchResult(frame=pl.DataFrame(schema=PRICE_COLUMNS), failures={t: offline for t in pending})
        got: list[pl.DataFrame] = []
        reasons: dict[str, str] = {}
        deadline = time.monotonic() + self.deadline_s
        # yfinance cannot be cancelled: each attempt runs in a worker thread we stop waiting for at the
        # deadline (its requests end on their own timeouts).
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="yfinance")
        try:
            for attempt in range(1, self.max_attempts + 1):
                self.attempts_made = attempt
                future = pool.submit(self._download, pending, start, end)
                # The deadline is "the attempt did not finish", never an exception type: since Python 3.11
                # concurrent.futures.TimeoutError is the builtin TimeoutError (= socket.timeout, errno ETIMEDOUT),
                # which the download itself raises on a timed-out socket; that is one failed attempt, retried.
                if not concurrent.futures.wait([future], timeout=max(deadline - time.monotonic(), 0.0)).done:
                    why = f"no answer within the {self.deadline_s:.0f}s deadline (network unreachable or silent?)"
                    return FetchResult(
                        frame=pl.concat(got) if got else pl.DataFrame(schema=PRICE_COLUMNS),
                        failures={t: f"{why} (attempt {attempt})" for t in pending},
                    )
                try:
                    frame, errors = future.result()
                    rows, failed = parse_download(frame, pending, self.name)
                    for ticker, why in failed.items():
                        reasons[ticker] = f"{why}: {errors[ticker]}" if ticker in errors else why
                except Exception as exc:  # network edge: any client error fails this attempt, not the run
                    rows = pl.DataFrame(schema=PRICE_COLUMNS)
                    failed = {t: f"{type(exc).__name__}: {exc}" for t in pending}
                    reasons.update(failed)
                got.append(rows)
                pending = [t for t in pending if t in failed]
                if not pending:
                    break
                if attempt < self.max_attempts:
                    delay = min(self.backoff_s * 2 ** (attempt - 1), max(deadline - time.monotonic(), 0.0))
                    log.warning("yahoo: %d ticker(s) failed (attempt %d/%d), retrying in %.1fs: %s",
                                len(pending), attempt, self.max_attempts, delay, pending)
                    self._sleep(delay)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        failures = {t: f"{reasons[t]} (after {self.attempts_made} attempts)" for t in pending}
        return FetchResult(frame=pl.concat(got) if got else pl.DataFrame(schema=PRICE_COLUMNS), failures=failures)
