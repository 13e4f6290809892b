"""Bring the lake's statistics table up to date: incrementally when the newest ingests only appended sessions,
otherwise a full recompute (see ``refresh_plan``). Plain DuckDB + Polars, no Dagster."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import duckdb
import polars as pl

from finpipe.market.lake import transaction
from finpipe.statistics.compute import (
    INCREMENTAL_TAIL_SESSIONS,
    STATISTICS_COLUMNS,
    compute_statistics,
    compute_statistics_for_dates,
)

STATISTICS_TABLE = "price_statistics"
# The table's COMMENT records what the last refresh saw (one transaction with the rows): the newest
# prices.ingested_at it read and a hash of the ticker -> universe map. A table without it (written by anything
# else, or by an older finpipe) is always fully recomputed.
STATE_VERSION = "finpipe.price_statistics/1"


def _universe_hash(universe_of: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(universe_of.items())).encode()).hexdigest()[:16]


def _state(con: duckdb.DuckDBPyConnection) -> dict | None:
    rows = con.execute(
        "SELECT comment FROM duckdb_tables() WHERE schema_name = 'main' AND table_name = ?", [STATISTICS_TABLE]
    ).fetchall()
    if not rows:
        return None
    try:
        state = json.loads(rows[0][0] or "")
    except ValueError:
        return {}
    return state if isinstance(state, dict) and state.get("version") == STATE_VERSION else {}


def refresh_plan(con: duckdb.DuckDBPyConnection, universe_of: dict[str, str]) -> tuple[str, str, list[dt.date]]:
    """``("incremental", why, new_dates)`` when only the rows of ``new_dates`` (all tickers) need computing,
    else ``("full", why, [])``.

    Incremental only if all hold: the table exists with the current columns and a refresh state; the
    instruments' universes are unchanged (they group ``rel_ret_Nd``); no prices row dated on or before its
    ticker's last statistics date was written after the last refresh (``ingested_at`` > the recorded
    watermark: a replaced or back-filled older session); per ticker, the prices rows dated on or before that
    last date are exactly as many as the statistics rows (nothing deleted or added underneath); every priced
    ticker is in the table and every ticker in the table is still priced (no new or dropped tickers); and no
    reject was recorded since the last refresh for an older session or an unknown ticker. The new dates are
    then the dates of the prices rows after their ticker's last statistics date; every row on those dates (of
    every ticker, for ``rel_ret_Nd``) is recomputed.
    """
    state = _state(con)
    if state is None:
        return "full", "no statistics table", []
    if not state:
        return "full", "the statistics table has no refresh state", []
    columns = [r[0] for r in con.execute(f"DESCRIBE {STATISTICS_TABLE}").fetchall()]
    if columns != list(STATISTICS_COLUMNS):
        return "full", "the statistics columns changed", []
    if state.get("universes") != _universe_hash(universe_of):
        return "full", "the instruments' universes changed", []
    watermark = dt.datetime.fromisoformat(state["prices_ingested_at"]) if state.get("prices_ingested_at") else None
    if watermark is None:
        return "full", "no ingest watermark", []
    (missing, dropped, count_mismatch, replaced, old_rejects) = con.execute(
        f"""
        WITH s AS (SELECT ticker, max(date) AS last, count(*) AS n FROM {STATISTICS_TABLE} GROUP BY ticker),
        p AS (
            SELECT p.ticker, any_value(s.last) AS last, any_value(s.n) AS n,
                   count(*) FILTER (WHERE p.date <= s.last) AS n_old,
                   count(*) FILTER (WHERE p.date <= s.last AND p.ingested_at > ?) AS changed_old
            FROM prices p LEFT JOIN s USING (ticker) GROUP BY p.ticker
        )
        SELECT
            (SELECT count(*) FROM p WHERE last IS NULL),
            (SELECT count(*) FROM s WHERE ticker NOT IN (SELECT ticker FROM p)),
            (SELECT count(*) FROM p WHERE last IS NOT NULL AND n_old <> n),
            (SELECT coalesce(sum(changed_old), 0) FROM p),
            (SELECT count(*) FROM price_rejects r LEFT JOIN s USING (ticker)
             WHERE r.rejected_at > ? AND (s.last IS NULL OR r.date IS NULL OR r.date <= s.last))
        """,
        [watermark, watermark],
    ).fetchall()[0]
    for count, why in ((missing, "new tickers"), (dropped, "tickers no longer priced"),
                       (count_mismatch, "tickers whose older price rows differ in number from their statistics"),
                       (replaced, "older price rows rewritten since the last refresh"),
                       (old_rejects, "rejects of older sessions since the last refresh")):
        if count:
            return "full", f"{count} {why}", []
    new_dates = [r[0] for r in con.execute(
        f"""SELECT DISTINCT p.date FROM prices p
            JOIN (SELECT ticker, max(date) AS last FROM {STATISTICS_TABLE} GROUP BY ticker) s USING (ticker)
            WHERE p.date > s.last ORDER BY 1"""
    ).fetchall()]
    return "incremental", f"{len(new_dates)} new session(s) appended", new_dates


def read_trailing_window(con: duckdb.DuckDBPyConnection, first_date: dt.date,
                         tail: int = INCREMENTAL_TAIL_SESSIONS) -> pl.DataFrame:
    """The prices ``compute_statistics_for_dates`` needs for dates from ``first_date`` on: per ticker, its rows
    dated ``first_date`` or later and the ``tail`` rows before them (by row count: per-ticker calendars).

    Reads only rows after a generous calendar bound (2 calendar days per session) when that provably holds the
    tail of every ticker (each ticker has ``tail`` rows before ``first_date`` after the bound, or no row before
    the bound); otherwise ranks the whole table. The bound only saves reading: the result is the same.
    """
    bound = first_date - dt.timedelta(days=2 * tail + 30)
    window_sql = """
        SELECT ticker, date, close, adj_close, volume FROM (
            SELECT *, row_number() OVER (PARTITION BY ticker ORDER BY date DESC) AS from_end,
                   count(*) FILTER (WHERE date >= $first) OVER (PARTITION BY ticker) AS recent
            FROM prices WHERE date >= $bound)
        WHERE from_end <= recent + $tail
        """
    (short,) = con.execute(
        """
        WITH short AS (SELECT ticker FROM prices WHERE date >= $bound GROUP BY ticker
                       HAVING count(*) FILTER (WHERE date < $first) < $tail)
        SELECT count(*) FROM prices WHERE date < $bound AND ticker IN (SELECT ticker FROM short)
        """,
        {"bound": bound, "first": first_date, "tail": tail},
    ).fetchall()[0]
    if short:
        bound = dt.date.min
    return con.sql(window_sql, params={"bound": bound, "first": first_date, "tail": tail}).pl()


def _write_state(con: duckdb.DuckDBPyConnection, watermark, universe_of: dict[str, str]) -> None:
    state = {"version": STATE_VERSION, "prices_ingested_at": watermark.isoformat() if watermark else None,
             "universes": _universe_hash(universe_of)}
    con.execute(f"COMMENT ON TABLE {STATISTICS_TABLE} IS '{json.dumps(state)}'")


def refresh_statistics(con: duckdb.DuckDBPyConnection, force_full: bool = False) -> dict:
    """Bring the statistics table up to date inside one transaction on ``con`` (a write connection, which
    holds the lake's lock, so the plan, the prices read and the write see one snapshot). Returns what ran."""
    try:
        with transaction(con):
            universe_of = dict(con.execute("SELECT ticker, universe FROM instruments").fetchall())
            (watermark,) = con.execute("SELECT max(ingested_at) FROM prices").fetchall()[0]
            mode, why, new_dates = ("full", "forced", []) if force_full else refresh_plan(con, universe_of)
            if mode == "full":
                prices = con.sql("SELECT ticker, date, close, adj_close, volume FROM prices").pl()
                if prices.height == 0:
                    raise ValueError("the prices table is empty: materialize daily_prices first")
                stats = compute_statistics(prices, universe_of).select(STATISTICS_COLUMNS)
                con.register("incoming_statistics", stats.to_arrow())
                con.execute(f"CREATE OR REPLACE TABLE {STATISTICS_TABLE} AS SELECT * FROM incoming_statistics")
                prices_read, written = prices.height, stats
            else:
                prices = read_trailing_window(con, new_dates[0]) if new_dates else None
                written = (compute_statistics_for_dates(prices, new_dates, universe_of) if new_dates
                           else pl.DataFrame(schema=con.sql(f"SELECT * FROM {STATISTICS_TABLE} LIMIT 0").pl().schema))
                prices_read = prices.height if prices is not None else 0
                if new_dates:
                    con.register("incoming_statistics", written.to_arrow())
                    con.execute(f"DELETE FROM {STATISTICS_TABLE} WHERE date IN (SELECT unnest(?))", [new_dates])
                    con.execute(f"INSERT INTO {STATISTICS_TABLE} BY NAME SELECT * FROM incoming_statistics")
            _write_state(con, watermark, universe_of)
    finally:
        try:
            con.unregister("incoming_statistics")
        except Exception:  # noqa: BLE001 - nothing was registered
            pass
    return {"refresh": mode, "refresh_reason": why, "rows_written": written.height, "price_rows_read": prices_read,
            "dates_written": len(new_dates) if mode == "incremental" else written["date"].n_unique(),
            "written": written}
