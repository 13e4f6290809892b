"""The lake's latest facts, held in memory for the server.

A nightly run writes the lake, and DuckDB admits no reader while a process writes: a server that opened the lake
per request would stall for the whole write. The server reads a snapshot instead — the newest ``SESSIONS`` sessions
of statistics and prices of every ticker, copied into an in-memory DuckDB — and refreshes it when the lake file
changes and can be read (a locked lake keeps the previous snapshot, and the answer says as of which date it is).
A lake file that goes missing or is damaged after the first read keeps the last good snapshot too, and ``problem``
says why (the server reports it as a degradation) until a readable lake is back. ``finpipe.inference.context.LakeFacts``
runs its usual queries against the snapshot, and one ``LakeFacts`` per snapshot (``facts``) remembers their answers:
a request grounds in microseconds instead of re-running the same queries (tickers, names, latest rows) each time.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

SESSIONS = 60  # per ticker: enough for the newest common date of any two tickers
REFRESH_EVERY_S = 5.0


class LakeSnapshot:
    """``query``/``path`` like ``PriceLake``, answered from memory."""

    def __init__(self, lake_path: Path, log=print, sessions: int | None = SESSIONS):
        """``sessions``: the newest sessions kept per ticker (None: all of them, for answering as of past dates)."""
        import duckdb

        self.path = Path(lake_path)
        self.sessions = sessions
        self.log = log
        self._con = duckdb.connect(":memory:")
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._failed: tuple[int, int] | None = None  # the stamp of a file that could not be read: not read again
        self._checked = 0.0
        self._refreshing = threading.Lock()
        self.loaded_at: float | None = None
        self.problem: str | None = None  # why the lake cannot be read now (the snapshot is older than the file)
        self._facts = None  # the snapshot's CachedFacts, made on first use after each load
        self.refresh(force=True)

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def refresh(self, force: bool = False) -> bool:
        """Reload when the lake file changed (at most every ``REFRESH_EVERY_S``); True when reloaded. Only the first
        read raises: afterwards a missing or unreadable lake keeps the last good snapshot and sets ``problem``."""
        now = time.monotonic()
        if not force and now - self._checked < REFRESH_EVERY_S:
            return False
        if not self._refreshing.acquire(blocking=self.loaded_at is None):
            return False  # another request is refreshing it now
        try:
            self._checked = now
            stamp = self._file_stamp()
            if self.loaded_at is None:
                if stamp is None:
                    raise FileNotFoundError(f"no lake at {self.path}: run `finpipe run` first")
                return self._load(stamp)
            if stamp is None:
                return self._trouble(f"the lake file {self.path} is missing (moved or deleted)")
            if stamp == self._stamp and not force:
                return self._trouble(None)  # the very file read last (moved back, say)
            if stamp == self._failed and not force:
                return False
            try:
                return self._load(stamp)
            except Exception as exc:  # damaged, truncated, not a lake, no statistics: answer from what was read
                self._failed = stamp
                return self._trouble(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))
        finally:
            self._refreshing.release()

    def _trouble(self, problem: str | None) -> bool:
        """Record (or clear) why the lake cannot be read; said in the log once per change."""
        if problem is not None:
            read = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.loaded_at))
            problem = f"{problem}; answering from the lake facts read at {read}"
        if problem != self.problem:
            self.log(problem or f"the lake {self.path} is readable again")
        self.problem = problem
        return False

    def _load(self, stamp: tuple[int, int]) -> bool:
        from finpipe.market.lake import LakeLockedError, PriceLake

        lake = PriceLake(self.path, lock_timeout_s=0.5 if self.loaded_at else 30.0)
        try:
            with lake.connect(read_only=True) as con:
                tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
                if "price_statistics" not in tables:
                    raise FileNotFoundError(f"the lake {self.path} has no statistics yet: run `finpipe run` first")
                newest = "" if self.sessions is None else \
                    f"QUALIFY row_number() OVER (PARTITION BY ticker ORDER BY date DESC) <= {int(self.sessions)}"
                stats = con.sql(f"SELECT * FROM price_statistics {newest}").to_arrow_table()
                prices = con.sql(f"SELECT * FROM prices {newest}").to_arrow_table()
                instruments = con.sql("SELECT * FROM instruments").to_arrow_table()
        except LakeLockedError:
            if self.loaded_at is None:
                raise
            self.log("the lake is being written: answering from the previous snapshot")
            return False
        with self._lock:
            for name, table in (("price_statistics", stats), ("prices", prices), ("instruments", instruments)):
                self._con.register(f"_{name}", table)
                self._con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM _{name}")
                self._con.unregister(f"_{name}")
            self._stamp, self.loaded_at, self._failed = stamp, time.time(), None
            self._facts = None
        self._trouble(None)
        return True

    def query(self, sql: str, params: list | None = None):
        with self._lock:
            return self._con.sql(sql, params=params).pl()

    def records(self, sql: str, params: list | None = None) -> list[dict]:
        """Rows as dicts (``PriceLake.records``), without polars."""
        with self._lock:
            cursor = self._con.execute(sql, params or [])
            columns = [d[0] for d in cursor.description]
            return [dict(zip(columns, row)) for row in cursor.fetchall()]

    def facts(self):
        """The ``LakeFacts`` of the snapshot as it is now, the same object until the snapshot is reloaded."""
        with self._lock:
            if self._facts is None:
                self._facts = _cached_facts_class()(self)
            return self._facts


def _cached_facts_class():
    from finpipe.inference.context import LakeFacts

    class CachedFacts(LakeFacts):
        """``LakeFacts`` whose rows are read once: the snapshot does not change under it (a reload makes a new one).
        Each caller gets its own copy of a row."""

        def __init__(self, lake) -> None:
            super().__init__(lake)
            self._latest: dict = {}
            self._pairs: dict = {}

        def latest(self, ticker: str) -> dict | None:
            if ticker not in self._latest:
                self._latest[ticker] = super().latest(ticker)
            row = self._latest[ticker]
            return None if row is None else dict(row)

        def latest_pair(self, a: str, b: str) -> tuple[dict, dict] | None:
            if (a, b) not in self._pairs:
                self._pairs[(a, b)] = super().latest_pair(a, b)
            pair = self._pairs[(a, b)]
            return None if pair is None else (dict(pair[0]), dict(pair[1]))

    return CachedFacts
