"""The DuckDB price lake: one file, schema'd tables, idempotent upserts, rejects kept with reasons.

Tables
- ``prices``        clean daily bars, primary key (ticker, date), each row labelled with its source
- ``price_rejects`` rows that failed validation, with the reason (idempotent: keyed by content hash)
- ``ingest_log``    one row per ticker per ingestion run: status, counts, failure reason
- ``instruments``   ticker metadata (name, kind, trading calendar) for everything in the lake

A whole ingestion batch is written in one transaction: a crash, a kill or an error leaves the lake
as it was before the batch. DuckDB admits one writing process per file, so connecting retries for a
bounded time and then fails with a message that names the lock.
"""

from __future__ import annotations

import datetime as dt
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import duckdb

if TYPE_CHECKING:  # polars and the ingest stack load only where frames are written: reading facts needs neither
    import polars as pl

    from finpipe.market.ingest import IngestBatch, TickerOutcome
    from finpipe.market.universes import Universe

# DuckDB 2.0 streams results: always fetch a result fully (fetchall) before the next statement.
# Files written by DuckDB >= 2.0 are unreadable by 1.x tools (incl. the `duckdb` shell on PyPI);
# creating the lake in the 1.5 storage format keeps it open to both.
STORAGE_COMPATIBILITY = "v1.5.0"

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS prices (
    ticker      VARCHAR   NOT NULL,
    date        DATE      NOT NULL,
    open        DOUBLE    NOT NULL,
    high        DOUBLE    NOT NULL,
    low         DOUBLE    NOT NULL,
    close       DOUBLE    NOT NULL,
    adj_close   DOUBLE    NOT NULL,
    volume      BIGINT    NOT NULL,
    source      VARCHAR   NOT NULL,
    simulated   BOOLEAN   NOT NULL,
    ingested_at TIMESTAMP NOT NULL,
    PRIMARY KEY (ticker, date)
);
CREATE TABLE IF NOT EXISTS price_rejects (
    reject_id   VARCHAR   PRIMARY KEY,
    ticker      VARCHAR,
    date        DATE,
    open        DOUBLE,
    high        DOUBLE,
    low         DOUBLE,
    close       DOUBLE,
    adj_close   DOUBLE,
    volume      DOUBLE,
    source      VARCHAR,
    reason      VARCHAR   NOT NULL,
    run_id      VARCHAR,
    rejected_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS ingest_log (
    run_id            VARCHAR   NOT NULL,
    logged_at         TIMESTAMP NOT NULL,
    source            VARCHAR   NOT NULL,
    universe          VARCHAR   NOT NULL,
    start_date        DATE      NOT NULL,
    end_date          DATE      NOT NULL,
    ticker            VARCHAR   NOT NULL,
    status            VARCHAR   NOT NULL,
    expected_sessions INTEGER   NOT NULL,
    rows_written      INTEGER   NOT NULL,
    rows_rejected     INTEGER   NOT NULL,
    missing_sessions  INTEGER   NOT NULL,
    reason            VARCHAR
);
CREATE TABLE IF NOT EXISTS instruments (
    ticker   VARCHAR PRIMARY KEY,
    name     VARCHAR NOT NULL,
    kind     VARCHAR NOT NULL,
    calendar VARCHAR NOT NULL,
    universe VARCHAR NOT NULL
);
"""

PRICE_VALUE_COLUMNS = ("ticker", "date", "open", "high", "low", "close", "adj_close", "volume", "source")


class CorruptLakeError(RuntimeError):
    """The lake file exists but is not a readable DuckDB database (truncated, overwritten, another format)."""


class LakeLockedError(RuntimeError):
    """Another process holds the lake file; ``pid``: that process, where known."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


def lock_holder(message: str) -> int | None:
    """The PID in DuckDB's lock conflict ("... Conflicting lock is held in /usr/bin/python (PID 1234) ...")."""
    import re

    found = re.search(r"\(PID (\d+)\)", message)
    return int(found.group(1)) if found else None


class SourceConflictError(RuntimeError):
    """Rows from one source would mix with rows from another source for the same ticker."""


@dataclass
class WriteSummary:
    inserted: int
    replaced: int
    rejected: int
    refused: dict[str, str] = field(default_factory=dict)  # ticker -> why its rows were not written
    outcomes: list[TickerOutcome] = field(default_factory=list)


def rows_of(cursor) -> list[dict]:
    """A DuckDB result's rows as dicts keyed by column name."""
    columns = [d[0] for d in cursor.description]
    return [dict(zip(columns, row)) for row in cursor.fetchall()]


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN ... COMMIT on ``con``; on any error ROLLBACK and re-raise, so the lake stays as it was."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def _is_damage(exc: BaseException) -> bool:
    """DuckDB's words for a damaged file: a checksum mismatch, a block past the end of a cut-off file."""
    text = str(exc)
    return "Corrupt database file" in text or "Could not read enough bytes from file" in text


class PriceLake:
    def __init__(self, path: Path | str, lock_timeout_s: float = 30.0) -> None:
        import math

        # a NaN deadline is never reached: the wait for a lock would never end
        if not (isinstance(lock_timeout_s, (int, float)) and math.isfinite(lock_timeout_s) and lock_timeout_s >= 0):
            raise ValueError(f"the lock timeout must be a finite number of seconds >= 0, got {lock_timeout_s}")
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        if read_only and not self.path.exists():
            raise FileNotFoundError(f"no lake at {self.path}: materialize the prices asset first (finpipe run)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        config = {} if self.path.exists() else {"storage_compatibility_version": STORAGE_COMPATIBILITY}
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.05
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only, config=config)
                break
            except duckdb.IOException as exc:
                # a read-only (or immutable: EPERM) lake file is not a damaged one
                if any(m in str(exc).lower() for m in ("permission denied", "operation not permitted")):
                    raise PermissionError(
                        f"cannot open the lake {self.path}{' for writing' if not read_only else ''}: permission "
                        f"denied; give this user write access to it, or point FINPIPE_LAKE_DIR at a lake of its "
                        f"own") from exc
                # only DuckDB's lock conflict waits ("Could not set lock on file"); a damaged block's checksum
                # error also contains "lock" (in "block") and must not wait 30 s to be called locked
                if "could not set lock" not in str(exc).lower():
                    if self.path.exists():
                        raise self._corrupt(exc) from exc
                    raise
                if time.monotonic() >= deadline:
                    raise LakeLockedError(
                        f"lake {self.path} is locked by another process (waited {self.lock_timeout_s:.0f}s): {exc}",
                        lock_holder(str(exc))) from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        try:
            if not read_only:
                con.execute(SCHEMA_SQL)
            yield con
        except duckdb.Error as exc:
            # damage inside the file (a bad block, a cut-off tail) shows only when that block is read
            if _is_damage(exc):
                raise self._corrupt(exc) from exc
            raise
        finally:
            con.close()

    def _corrupt(self, exc: Exception) -> CorruptLakeError:
        return CorruptLakeError(
            f"{self.path} is not a readable DuckDB lake ({str(exc).splitlines()[0]}); restore the last good copy "
            f"with `finpipe lake restore`, or move it aside and run `finpipe run` to rebuild it")

    # ---------------------------------------------------------------- writing

    def write_batch(self, batch: IngestBatch, run_id: str) -> WriteSummary:
        import polars as pl

        from finpipe.market.ingest import FAILED, TickerOutcome

        """Upsert clean rows, record rejects and the per-ticker log - all or nothing."""
        universe = batch.request.universe
        outcomes = {o.ticker: o for o in batch.outcomes}
        with self.connect() as con, transaction(con):
            refused = self._refuse_mixed_sources(con, batch)
            for ticker, why in refused.items():
                o = outcomes[ticker]
                outcomes[ticker] = TickerOutcome(ticker, FAILED, o.expected_sessions, 0, o.rejected,
                                                 o.expected_sessions, why)
            incoming = batch.clean.filter(~pl.col("ticker").is_in(list(refused)))
            inserted, replaced = self._upsert_prices(con, incoming, batch.simulated)
            rejected = self._record_rejects(con, batch.rejects, run_id)
            self._log(con, batch, list(outcomes.values()), run_id)
            self._register_instruments(con, universe, batch)
        return WriteSummary(inserted, replaced, rejected, refused, [outcomes[t] for t in universe.symbols])

    @staticmethod
    def _refuse_mixed_sources(con: duckdb.DuckDBPyConnection, batch: IngestBatch) -> dict[str, str]:
        tickers = batch.clean["ticker"].unique().to_list() if batch.clean.height else []
        if not tickers:
            return {}
        rows = con.execute(
            "SELECT ticker, any_value(source), bool_or(simulated) FROM prices "
            "WHERE ticker IN (SELECT unnest(?)) AND source <> ? GROUP BY ticker",
            [tickers, batch.source_name],
        ).fetchall()
        refused = {}
        for ticker, other, other_simulated in rows:
            kind = "simulated" if other_simulated else "real"
            refused[ticker] = (
                f"refused: the lake already holds {kind} rows from source {other!r} for {ticker}; "
                f"rows from {batch.source_name!r} would mix series. Use another lake (FINPIPE_LAKE_DIR) "
                f"or delete {ticker} first."
            )
        return refused

    @staticmethod
    def _upsert_prices(con: duckdb.DuckDBPyConnection, incoming: pl.DataFrame, simulated: bool) -> tuple[int, int]:
        if incoming.height == 0:
            return 0, 0
        con.register("incoming_prices", incoming.select(PRICE_VALUE_COLUMNS).to_arrow())
        try:
            (replaced,) = con.execute(
                "SELECT count(*) FROM prices p JOIN incoming_prices i USING (ticker, date)"
            ).fetchall()[0]
            con.execute(
                "INSERT OR REPLACE INTO prices "
                "SELECT ticker, date, open, high, low, close, adj_close, volume, source, ?, now()::TIMESTAMP "
                "FROM incoming_prices",
                [simulated],
            )
        finally:
            con.unregister("incoming_prices")
        return incoming.height - replaced, replaced

    @staticmethod
    def _record_rejects(con: duckdb.DuckDBPyConnection, rejects: pl.DataFrame, run_id: str) -> int:
        if rejects.height == 0:
            return 0
        con.register("incoming_rejects", rejects.select(*PRICE_VALUE_COLUMNS, "reason").to_arrow())
        try:
            con.execute(
                """
                INSERT OR REPLACE INTO price_rejects
                SELECT md5(concat_ws('|', ticker, date, open, high, low, close, adj_close, volume, source, reason)),
                       ticker, date, open, high, low, close, adj_close, volume, source, reason, ?, now()::TIMESTAMP
                FROM (SELECT DISTINCT * FROM incoming_rejects)
                """,
                [run_id],
            )
        finally:
            con.unregister("incoming_rejects")
        return rejects.height

    @staticmethod
    def _log(con, batch: IngestBatch, outcomes: list[TickerOutcome], run_id: str) -> None:
        req = batch.request
        con.executemany(
            "INSERT INTO ingest_log VALUES (?, now()::TIMESTAMP, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                [run_id, batch.source_name, req.universe.name, req.start, req.end, o.ticker, o.status,
                 o.expected_sessions, o.rows, o.rejected, o.missing_sessions, o.reason]
                for o in outcomes
            ],
        )

    @staticmethod
    def _register_instruments(con, universe: Universe, batch: IngestBatch) -> None:
        written = set(batch.clean["ticker"].unique().to_list()) if batch.clean.height else set()
        rows = [[t.symbol, t.name, t.kind, universe.calendar, universe.name] for t in universe.tickers if t.symbol in written]
        if rows:
            con.executemany("INSERT OR REPLACE INTO instruments VALUES (?, ?, ?, ?, ?)", rows)

    def replace_table(self, table: str, frame: pl.DataFrame) -> None:
        """Replace a derived table (e.g. statistics) with ``frame`` atomically."""
        if not table.isidentifier():
            raise ValueError(f"not a table name: {table!r}")
        with self.connect() as con:
            con.register("incoming_frame", frame.to_arrow())
            try:
                with transaction(con):
                    con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM incoming_frame")
            finally:
                con.unregister("incoming_frame")

    # ---------------------------------------------------------------- reading

    def query(self, sql: str, params: list | None = None) -> pl.DataFrame:
        with self.connect(read_only=True) as con:
            return con.sql(sql, params=params).pl()

    def records(self, sql: str, params: list | None = None) -> list[dict]:
        """Rows as dicts, without polars: what answering a question reads (``finpipe.inference.context.LakeFacts``)."""
        with self.connect(read_only=True) as con:
            return rows_of(con.execute(sql, params or []))

    def query_untrusted(self, sql: str) -> pl.DataFrame:
        """A user's SQL, read-only in every way: a read-only connection that can reach no file, attach no
        database, load no extension, and cannot switch any of that back on."""
        with self.connect(read_only=True) as con:
            con.execute("SET enable_external_access = false")
            con.execute("SET autoload_known_extensions = false")
            con.execute("SET autoinstall_known_extensions = false")
            con.execute("SET lock_configuration = true")
            relation = con.sql(sql)
            if relation is None:
                raise ValueError("the statement returned no rows to show (only SELECT-like queries are answered)")
            return relation.pl()

    def prices(self, tickers: list[str] | None = None, start: dt.date | None = None,
               end: dt.date | None = None) -> pl.DataFrame:
        where, params = ["1=1"], []
        if tickers:
            where.append("ticker IN (SELECT unnest(?))")
            params.append(tickers)
        if start:
            where.append("date >= ?")
            params.append(start)
        if end:
            where.append("date <= ?")
            params.append(end)
        sql = f"SELECT * FROM prices WHERE {' AND '.join(where)} ORDER BY ticker, date"
        with self.connect(read_only=True) as con:
            return con.sql(sql, params=params).pl()
