"""Builders every test module may use: dates, the offline samples and split, tiny models, Dagster lineage runs and
the faked Yahoo edge. Test modules import from here, never from each other."""

from __future__ import annotations

import datetime as dt
import logging
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from finpipe.models.tiny import make_tiny_llama  # noqa: F401 (re-exported for the tests)

if TYPE_CHECKING:
    from finpipe.market.lake import PriceLake

FIXTURES = Path(__file__).parent / "fixtures"


def d(text: str) -> dt.date:
    return dt.date.fromisoformat(text)


# ------------------------------------------------------------------------------------ samples and splits


def replay_inputs():
    from finpipe.instructions.offline import replay_inputs as inputs

    return inputs()


def samples(**spec):
    """Grounded samples of the offline replay (2011-03-01 .. 2013-03-01) with DatasetSpec overrides."""
    from finpipe.instructions.offline import offline_samples

    return offline_samples(**spec)


@lru_cache(maxsize=1)
def default_samples():
    return samples()


@lru_cache(maxsize=1)
def tiny_split():
    """A small temporal split of real replay samples (every 9th session), for training tests."""
    from finpipe.instructions.split import SplitSpec, temporal_split

    return temporal_split(samples(date_stride=9), SplitSpec(val_fraction=0.2))


# ------------------------------------------------------------------------------------ Dagster lineage runs


def lake_inputs(lake: PriceLake):
    stats = lake.query("SELECT * FROM price_statistics")
    prices = lake.query("SELECT ticker, date, open, high, low FROM prices")
    names = dict(lake.query("SELECT ticker, name FROM instruments").iter_rows())
    return stats, prices, names



def ingest(resources, first="2011-03-01", last="2013-03-01"):
    import dagster as dg

    from finpipe.definitions import in_groups
    from finpipe.defs.partitions import PARTITION_RANGE_END_TAG, PARTITION_RANGE_START_TAG

    dg.materialize(in_groups("market_data"), resources=resources,
                   tags={PARTITION_RANGE_START_TAG: first, PARTITION_RANGE_END_TAG: last})


def derive(resources, samples_config=None, split_config=None):
    import dagster as dg

    from finpipe.definitions import in_groups

    ops = {}
    if samples_config:
        ops["instruction_samples"] = {"config": samples_config}
    if split_config:
        ops["dataset_split"] = {"config": split_config}
    return dg.materialize(in_groups("statistics", "datasets"), resources=resources, raise_on_error=False,
                          run_config={"ops": ops})


def checks(result):
    return {c.check_name: c.passed for c in result.get_asset_check_evaluations()}


# ------------------------------------------------------------------------------------ the Yahoo edge, faked

RECORDED = FIXTURES / "yahoo_download_AAPL_MSFT_DEAD_2013-02-25_2013-03-01.csv"


def recorded_frame() -> pd.DataFrame:
    return pd.read_csv(RECORDED, header=[0, 1], index_col=0, parse_dates=True)


class FakeYahoo:
    """Stands in for ``yfinance.download``: serves the recorded columns of the requested tickers."""

    def __init__(self, frame: pd.DataFrame | None = None, fail_first: int = 0, error: Exception | None = None):
        self.frame = recorded_frame() if frame is None else frame
        self.fail_first = fail_first
        self.error = error
        self.calls: list[dict] = []

    def __call__(self, tickers, **kwargs):
        self.calls.append({"tickers": list(tickers), **kwargs})
        if self.error is not None or len(self.calls) <= self.fail_first:
            raise self.error or ConnectionError("Could not resolve host: query2.finance.yahoo.com")
        keep = [c for c in self.frame.columns if c[1] in tickers]
        for t in tickers:  # like yfinance 1.x, failures are only logged
            if t not in self.frame.columns.get_level_values(1) or self.frame.xs(t, axis=1, level=1).isna().all().all():
                logging.getLogger("yfinance").error(f"['{t}']: possibly delisted; no timezone found")
        return self.frame[keep]


def resolves_yahoo(monkeypatch) -> None:
    """The outside world's DNS answers for Yahoo (the source checks it before downloading); the fake downloader
    decides what the network then does."""
    import socket

    from finpipe.market.sources import yahoo

    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == yahoo.YAHOO_HOST:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 443))]  # TEST-NET-1: never dialled
        return real(host, *args, **kwargs)

    monkeypatch.setattr(yahoo.socket, "getaddrinfo", getaddrinfo)


def run_yahoo(lake_resources, monkeypatch, fake, first="2013-02-25", last="2013-03-01"):
    import dagster as dg
    import yfinance

    from finpipe.definitions import in_groups
    from finpipe.defs.partitions import PARTITION_RANGE_END_TAG, PARTITION_RANGE_START_TAG

    monkeypatch.setattr(yfinance, "download", fake)
    resolves_yahoo(monkeypatch)
    resources = lake_resources(source="yahoo", universe="us_core", tickers=["AAPL", "MSFT", "DEAD"],
                               yahoo_backoff_s=0.01, yahoo_max_attempts=2, retry_when_all_fail=False)
    return dg.materialize(in_groups("market_data"), resources=resources, raise_on_error=False,
                          tags={PARTITION_RANGE_START_TAG: first, PARTITION_RANGE_END_TAG: last})


def query(lake_dir, sql):
    import duckdb

    from finpipe.paths import LAKE_DB_NAME

    con = duckdb.connect(str(lake_dir / LAKE_DB_NAME), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``finpipe ARGV`` in this process: (exit code, stdout, stderr)."""
    from finpipe.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def free_port() -> int:
    """A loopback port nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process, grace_s: float = 20) -> None:
    """Stop a server a test started with ``start_new_session=True``, and every process it started: SIGTERM, then
    SIGKILL after ``grace_s``."""
    import os
    import signal
    import subprocess

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        process.wait(timeout=10)
