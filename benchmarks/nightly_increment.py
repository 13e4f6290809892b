"""The nightly increment: time to add ONE new session to a lake that already holds N sessions, for several N.

    python -m benchmarks.nightly_increment [--quick] [--json PATH] [--sessions 250,1000,2500] [--tickers 300]

For every N a fresh DuckDB lake (temp dir) is backfilled with N sessions x ``--tickers`` synthetic tickers from the
simulated source (``finpipe.market.sources.simulated``) and its statistics table is computed; then ``--repeats``
new sessions are added one at a time, each through:

    fetch_validate   ``finpipe.market.ingest.ingest`` for the new day (source + validation; the new days are the
                     same dates for every N, so this step does the same work for every N)
    ingest_upsert    ``PriceLake.write_batch``: the upsert into ``prices`` + rejects + ingest log, one transaction
    stats_asset      the ``price_statistics`` Dagster asset itself (it picks its refresh path: incremental when
                     the batch only appended sessions, else a full recompute; the path it took is reported)
    stats_full       a full recompute step by step (read every price row / ``compute_statistics`` / write a side
                     table, timed separately), without the asset's metadata: the reference rows for the checks
    stats_incremental  finpipe's incremental function step by step: ``read_trailing_window`` (the trailing ``tail``
                     rows per ticker), ``compute_statistics_for_dates`` for the new day, upsert only its rows

The incremental function's (and the asset's) new-day rows are asserted equal (rtol 1e-9, same nulls) to the full recompute's. Its
tail is 513 sessions, not 252: every window statistic looks back at most 252 sessions (definitions.py), but
Wilder's RSI is an exponential recursion seeded at the ticker's 15th row, so it depends on the whole history;
the seed's weight decays as (13/14)^k and is below 1e-16 after 498 sessions. The error a 252-session tail
would leave in rsi_14 is measured and reported.

Printed per N: the median seconds of each step, and for each step time(N_max) / time(N_min).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from benchmarks import _common
from finpipe import runtime
from finpipe.statistics.compute import INCREMENTAL_TAIL_SESSIONS as RSI_EXACT_TAIL  # 513, derived there

NAME = "nightly_increment"
CALENDAR = "XNYS"
FIRST_NEW_DAY = dt.date(2019, 1, 2)  # the new sessions are the same dates for every N (the lake ends before it)
STEPS = ("fetch_validate", "ingest_upsert", "stats_asset", "stats_full", "stats_incremental")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 lake sizes x 6 tickers, one new day (seconds)")
    p.add_argument("--json", help=f"results file (default benchmarks/results/{NAME}.json)")
    p.add_argument("--sessions", help="comma-separated lake sizes N in sessions (default 250,1000,2500; "
                   "quick 40,600)")
    p.add_argument("--tickers", type=int, help="synthetic universe size (default 300; quick 6)")
    p.add_argument("--repeats", type=int, help="new days added per N, medians reported (default 3; quick 1)")
    p.add_argument("--tail", type=int, default=RSI_EXACT_TAIL,
                   help=f"sessions the incremental variant reads (default {RSI_EXACT_TAIL})")
    p.add_argument("--seed", type=int, default=7, help="simulated source seed")
    args = p.parse_args(argv)
    args.sessions = [int(x) for x in (args.sessions or ("40,600" if args.quick else "250,1000,2500")).split(",")]
    args.tickers = args.tickers or (6 if args.quick else 300)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if min(args.sessions) < 2 or args.tickers < 1 or args.repeats < 1:
        p.error("--sessions must be >= 2, --tickers and --repeats >= 1")
    return args


def synthetic_universe(tickers: int):
    from finpipe.market.universes import Ticker, Universe

    return Universe("bench_simulated", f"{tickers} simulated tickers (benchmark)", CALENDAR,
                    tuple(Ticker(f"SIM{i:04d}", f"Simulated {i}", "equity") for i in range(tickers)))


def session_dates(n_before: int, n_new: int) -> tuple[list[dt.date], list[dt.date]]:
    """The ``n_before`` sessions before FIRST_NEW_DAY and the ``n_new`` sessions from it on."""
    from finpipe.market import calendars

    days = calendars.sessions(CALENDAR, calendars.CALENDAR_START, FIRST_NEW_DAY + dt.timedelta(days=2 * n_new + 10))
    i = days.index(FIRST_NEW_DAY)
    if i < n_before:
        raise SystemExit(f"at most {i} sessions fit before {FIRST_NEW_DAY} on {CALENDAR}")
    return days[i - n_before: i], days[i: i + n_new]


def stats_full(lake, table: str) -> tuple[pl.DataFrame, dict[str, float]]:
    """What the price_statistics asset does, step by step (without its metadata)."""
    from finpipe.statistics.compute import STATISTICS_COLUMNS, compute_statistics

    t0 = time.perf_counter()
    prices = lake.query("SELECT ticker, date, close, adj_close, volume FROM prices")
    universe_of = dict(lake.query("SELECT ticker, universe FROM instruments").iter_rows())
    t1 = time.perf_counter()
    stats = compute_statistics(prices, universe_of).select(STATISTICS_COLUMNS)
    t2 = time.perf_counter()
    lake.replace_table(table, stats)
    t3 = time.perf_counter()
    return stats, {"read_s": t1 - t0, "compute_s": t2 - t1, "write_s": t3 - t2, "rows_read": prices.height}


def stats_incremental(lake, table: str, new_day: dt.date, tail: int) -> tuple[pl.DataFrame, dict[str, float]]:
    """finpipe's incremental path step by step: ``read_trailing_window`` (the last ``tail`` rows per ticker
    before ``new_day``, by row count) in, ``compute_statistics_for_dates`` out, the new day's rows upserted into
    ``table``. Valid when the batch only appended ``new_day`` (no rewritten history)."""
    from finpipe.statistics.compute import compute_statistics_for_dates
    from finpipe.statistics.refresh import read_trailing_window

    t0 = time.perf_counter()
    with lake.connect() as con:
        prices = read_trailing_window(con, new_day, tail)
        universe_of = dict(con.execute("SELECT ticker, universe FROM instruments").fetchall())
        t1 = time.perf_counter()
        new = compute_statistics_for_dates(prices, [new_day], universe_of, tail=tail)
        t2 = time.perf_counter()
        con.register("incoming_statistics", new.to_arrow())
        try:
            con.execute("BEGIN TRANSACTION")
            con.execute(f"DELETE FROM {table} WHERE date = ?", [new_day])
            con.execute(f"INSERT INTO {table} SELECT * FROM incoming_statistics")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            con.unregister("incoming_statistics")
    t3 = time.perf_counter()
    return new, {"read_s": t1 - t0, "compute_s": t2 - t1, "write_s": t3 - t2, "rows_read": prices.height}


WRITE_PARTS = ("_refuse_mixed_sources", "_upsert_prices", "_record_rejects", "_log", "_register_instruments")


@contextlib.contextmanager
def timed_write_parts(into: dict[str, float]):
    """Time the statements of ``PriceLake.write_batch`` (its static helpers, wrapped for the duration); whatever
    is left of the total is connecting, BEGIN/COMMIT (incl. DuckDB's checkpoint) and closing."""
    from finpipe.market.lake import PriceLake

    originals = {name: PriceLake.__dict__[name] for name in WRITE_PARTS}

    def timed(name, fn):
        def wrapper(*a, **kw):
            started = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                into[name.strip("_")] = into.get(name.strip("_"), 0.0) + time.perf_counter() - started
        return staticmethod(wrapper)

    try:
        for name, original in originals.items():
            setattr(PriceLake, name, timed(name, original.__func__))
        yield into
    finally:
        for name, original in originals.items():
            setattr(PriceLake, name, original)


def compare(ours: pl.DataFrame, reference: pl.DataFrame) -> dict[str, float]:
    """Max abs difference per float column; raises unless equal within rtol 1e-9 with identical nulls."""
    ours, reference = ours.sort("ticker"), reference.sort("ticker")
    assert ours["ticker"].to_list() == reference["ticker"].to_list(), "different tickers on the new day"
    diffs = {}
    for col in ours.columns:
        if col in ("ticker", "date"):
            assert ours[col].to_list() == reference[col].to_list(), col
            continue
        a = ours[col].cast(pl.Float64).to_numpy()
        b = reference[col].cast(pl.Float64).to_numpy()
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{col}: null patterns differ")
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=col)
        both = ~np.isnan(a)
        diffs[col] = float(np.max(np.abs(a[both] - b[both]))) if both.any() else 0.0
    return diffs


def run_size(n: int, args, workdir: Path) -> dict[str, Any]:
    import dagster as dg

    from finpipe.defs.resources import LakeResource
    from finpipe.defs.statistics import STATISTICS_TABLE, price_statistics
    from finpipe.market.ingest import IngestRequest, ingest
    from finpipe.market.sources.simulated import SimulatedSource

    universe = synthetic_universe(args.tickers)
    source = SimulatedSource(CALENDAR, seed=args.seed)
    before, new_days = session_dates(n, args.repeats)
    resource = LakeResource(lake_dir=str(workdir / f"lake_{n}"))
    lake = resource.prices_lake()

    started = time.perf_counter()
    backfill = ingest(source, IngestRequest(universe, before[0], before[-1]))
    lake.write_batch(backfill, run_id=f"backfill-{n}")
    price_statistics(dg.build_asset_context(), lake=resource)  # also warms Dagster up outside the timings
    setup_s = time.perf_counter() - started
    del backfill

    times: dict[str, list[float]] = {s: [] for s in STEPS}
    parts: dict[str, list[dict]] = {"ingest_upsert": [], "stats_full": [], "stats_incremental": []}
    diffs: dict[str, float] = {}
    refreshes: list[str] = []  # the asset's own choice per new day (metadata "refresh")
    for day in new_days:
        with _common.Timer() as t:
            batch = ingest(source, IngestRequest(universe, day, day))
        times["fetch_validate"].append(t.seconds)
        assert batch.clean.height == args.tickers and batch.clean["date"].unique().to_list() == [day]
        write_parts: dict[str, float] = {}
        with timed_write_parts(write_parts), _common.Timer() as t:
            summary = lake.write_batch(batch, run_id=f"nightly-{day}")
        times["ingest_upsert"].append(t.seconds)
        write_parts["connect_commit_close"] = t.seconds - sum(write_parts.values())
        parts["ingest_upsert"].append(write_parts)
        assert (summary.inserted, summary.replaced) == (args.tickers, 0), summary

        with _common.Timer() as t:
            asset_result = price_statistics(dg.build_asset_context(), lake=resource)
        times["stats_asset"].append(t.seconds)
        refreshes.append(asset_result.metadata["refresh"])
        asset_rows = lake.query(f"SELECT * FROM {STATISTICS_TABLE} WHERE date = ?", [day])
        with _common.Timer() as t:  # into a side table: replacing the asset's table would drop its refresh state
            full, part = stats_full(lake, f"{STATISTICS_TABLE}_full_reference")
        times["stats_full"].append(t.seconds)
        parts["stats_full"].append(part)
        with _common.Timer() as t:
            incremental, part = stats_incremental(lake, STATISTICS_TABLE, day, args.tail)
        times["stats_incremental"].append(t.seconds)
        parts["stats_incremental"].append(part)

        reference = full.filter(pl.col("date") == day)
        for col, d in compare(incremental, reference).items():
            diffs[col] = max(diffs.get(col, 0.0), d)
        compare(asset_rows, reference)  # the asset wrote the same rows as the step-by-step full recompute

    # Why the tail is not 252 sessions: RSI's recursion remembers the whole history
    short_tail, _ = stats_incremental(lake, STATISTICS_TABLE, new_days[-1], min(252, args.tail))
    rsi_err = float((short_tail.sort("ticker")["rsi_14"] - reference.sort("ticker")["rsi_14"]).abs().max() or 0.0)
    stats_incremental(lake, STATISTICS_TABLE, new_days[-1], args.tail)  # leave the exact rows in the table

    with lake.connect(read_only=True) as con:
        (rows,) = con.execute("SELECT count(*) FROM prices").fetchall()[0]
    row = {"sessions": n, "tickers": args.tickers, "lake_rows": rows, "setup_s": setup_s}
    row |= {f"{s}_s": statistics.median(v) for s, v in times.items()}
    for step in ("stats_full", "stats_incremental"):
        for k in ("read_s", "compute_s", "write_s"):
            row[f"{step}_{k}"] = statistics.median(p[k] for p in parts[step])
        row[f"{step}_rows_read"] = parts[step][0]["rows_read"]
    for k in parts["ingest_upsert"][0]:
        row[f"ingest_upsert_{k}_s"] = statistics.median(p[k] for p in parts["ingest_upsert"])
    row["incremental_speedup"] = row["stats_full_s"] / row["stats_incremental_s"]
    row["incremental_max_abs_diff"] = max(diffs.values()) if diffs else 0.0
    row["incremental_max_abs_diff_by_column"] = diffs
    row["rsi_max_abs_diff_tail_252"] = rsi_err
    row["stats_asset_refresh"] = ",".join(sorted(set(refreshes)))
    row["all_s"] = times
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    machine = _common.machine(torch_needed=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="finpipe-bench-nightly-") as tmp:
        for n in sorted(args.sessions):
            print(f"lake with {n} sessions x {args.tickers} tickers ...", flush=True)
            rows.append(run_size(n, args, Path(tmp)))
            runtime.release_memory()
    small, large = rows[0], rows[-1]
    growth = {f"{s}_ratio_Nmax_over_Nmin": round(large[f"{s}_s"] / small[f"{s}_s"], 2) for s in STEPS}
    size_ratio = large["lake_rows"] / small["lake_rows"]
    result = {
        "benchmark": NAME,
        "machine": machine,
        "config": {"quick": args.quick, "sessions": args.sessions, "tickers": args.tickers, "repeats": args.repeats,
                   "incremental_tail_sessions": args.tail, "first_new_day": FIRST_NEW_DAY.isoformat(),
                   "calendar": CALENDAR, "source": f"simulated (seed {args.seed})"},
        "rows": rows,
        "growth": growth | {"lake_rows_ratio": round(size_ratio, 2)},
        "checks": {"incremental_new_day_rows_equal_full_recompute": "rtol 1e-9, identical nulls",
                   "asset_rows_equal_step_by_step_recompute": True,
                   "one_row_inserted_per_ticker_per_day": True},
    }
    columns = ["sessions", "lake_rows", *[f"{s}_s" for s in STEPS], "stats_asset_refresh", "incremental_speedup",
               "incremental_max_abs_diff", "rsi_max_abs_diff_tail_252"]
    table = _common.format_table(rows, columns)
    table += f"\ntime(N={large['sessions']}) / time(N={small['sessions']}) (lake rows x{size_ratio:.1f}): " + ", ".join(
        f"{s} {growth[f'{s}_ratio_Nmax_over_Nmin']}" for s in STEPS)
    breakdown = [{"sessions": r["sessions"], **{f"{st}_{k}": r[f"{st}_{k}"] for st in ("stats_full", "stats_incremental")
                                                for k in ("read_s", "compute_s", "write_s")}} for r in rows]
    table += "\n" + _common.format_table(breakdown, list(breakdown[0]))
    upsert = [{"sessions": r["sessions"], "ingest_upsert_s": r["ingest_upsert_s"],
               **{k.replace("ingest_upsert_", "upsert:"): v for k, v in r.items()
                  if k.startswith("ingest_upsert_") and k.endswith("_s") and k != "ingest_upsert_s"}} for r in rows]
    table += "\n" + _common.format_table(upsert, list(upsert[0]))
    return _common.finish(NAME, result, args.json, table)


if __name__ == "__main__":
    main()
