"""Copies of the lake file after each successful run, a check, and a restore: a damaged lake loses at most the
last run, never the run registry, the champion's history or the ingest log (which no source can rebuild).

A snapshot is a byte copy of ``finpipe.duckdb`` taken while a read-only connection holds the file (so no writer is
mid-write), kept in ``<lake>/snapshots/`` (the newest ``KEEP``). ``restore`` holds the lake's lock throughout (so no
other process writes into the file it replaces), restores a damaged lake, and a healthy one only when forced; it
keeps the replaced file beside it, never deleting it, and copies the chosen snapshot into place.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

KEEP = 3
FOLDER = "snapshots"
#: seconds ``check`` and ``restore`` wait for another process to let go of the lake
LOCK_TIMEOUT_S = 5.0


def snapshots_dir(db_path: Path) -> Path:
    return Path(db_path).parent / FOLDER


def list_snapshots(db_path: Path) -> list[Path]:
    """Snapshots of ``db_path``, newest first."""
    folder = snapshots_dir(db_path)
    return sorted(folder.glob(f"{Path(db_path).stem}-*.duckdb"), reverse=True) if folder.is_dir() else []


def snapshot(db_path: Path, keep: int = KEEP, lock_timeout_s: float = 10.0) -> Path | None:
    """Copy the lake (only after it passes ``check``) and drop the oldest snapshots beyond ``keep``; the path of
    the snapshot holding the lake as it is now (None without a lake). A lake byte-identical to the newest snapshot
    is not copied again, so two takers after the same run (the CLI and the UI's sensor) keep one copy."""
    import filecmp

    from finpipe.market.lake import PriceLake

    db_path = Path(db_path)
    if not db_path.exists():
        return None
    folder = snapshots_dir(db_path)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = folder / f"{db_path.stem}-{stamp}.duckdb"
    tmp = folder / f".{target.name}.tmp"
    with PriceLake(db_path, lock_timeout_s=lock_timeout_s).connect(read_only=True) as con:
        con.execute("SELECT count(*) FROM information_schema.tables").fetchall()  # readable, and held
        shutil.copyfile(db_path, tmp)
    newest = next(iter(list_snapshots(db_path)), None)
    if newest is not None and filecmp.cmp(tmp, newest, shallow=False):
        tmp.unlink()
        return newest
    tmp.replace(target)
    for old in list_snapshots(db_path)[keep:]:
        old.unlink(missing_ok=True)
    return target


@dataclass
class LakeHealth:
    path: Path
    ok: bool
    tables: dict[str, int]
    problem: str | None = None


def check(db_path: Path, lock_timeout_s: float = LOCK_TIMEOUT_S) -> LakeHealth:
    """Open the lake read-only and count every table's rows: a damaged file fails here, with the reason. A lake held
    by another process is not damaged: that is a ``LakeLockedError``, as when opening it for any other purpose."""
    from finpipe.market.lake import CorruptLakeError, LakeLockedError, PriceLake

    try:
        with PriceLake(db_path, lock_timeout_s=lock_timeout_s).connect(read_only=True) as con:
            names = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables "
                                               "ORDER BY table_name").fetchall()]
            # hashing each whole row reads every block (count(*) alone can be answered from metadata)
            counts = {n: con.execute(f'SELECT count(*), max(hash(t)) FROM "{n}" AS t').fetchall()[0][0]
                      for n in names}
    except LakeLockedError as exc:
        raise LakeLockedError(f"lake {db_path} is held by another process (pid {exc.pid or 'unknown'}): not checked; "
                              "run the check again once that process is done", exc.pid) from None
    except PermissionError:  # not readable by this user: not damage either
        raise
    except CorruptLakeError as exc:
        return LakeHealth(Path(db_path), False, {}, str(exc))
    except Exception as exc:  # a file that opens but cannot be read through
        return LakeHealth(Path(db_path), False, {}, f"{type(exc).__name__}: {exc}")
    return LakeHealth(Path(db_path), True, counts)


class HealthyLakeError(ValueError):
    """``restore`` refused: the lake is healthy, and restoring would roll back what it holds beyond the snapshot."""


@dataclass
class Restored:
    snapshot: Path  # restored from
    aside: Path | None  # the replaced file, kept: <name>.damaged-<time> or <name>.replaced-<time>
    damaged: bool  # the replaced lake failed the check (False: healthy and forced, or there was none)
    rolled_back: list[str] = field(default_factory=list)  # what the healthy lake held beyond the snapshot


def restore(db_path: Path, snapshot_path: Path | None = None, force: bool = False,
            lock_timeout_s: float = LOCK_TIMEOUT_S, log: Callable[[str], None] = print) -> Restored:
    """Put a snapshot (the newest that passes ``check`` by default) in place of a damaged lake.

    The lake's write lock is held from the check to the swap: another process's writes can neither land in the file
    being replaced nor be overwritten, and a lake another process holds is a ``LakeLockedError``. A healthy lake is
    replaced only with ``force``, after ``log`` says what it holds that the snapshot does not (``HealthyLakeError``
    otherwise). The replaced file is kept beside the lake, named by what it was."""
    db_path = Path(db_path)
    candidates = [Path(snapshot_path)] if snapshot_path else list_snapshots(db_path)
    chosen = next((c for c in candidates if c.exists() and c.resolve() != db_path.resolve() and check(c).ok), None)
    if chosen is None:
        raise FileNotFoundError(f"no readable snapshot of {db_path} in {snapshots_dir(db_path)}"
                                if not snapshot_path else f"{snapshot_path} is not a readable snapshot of {db_path}")
    with _exclusive(db_path, lock_timeout_s) as held:
        damaged, rolled_back = False, []
        if held is not None:
            with _private_copy(held, db_path) as copy:
                health = check(copy)
                damaged = not health.ok
                rolled_back = [] if damaged else _rolled_back(copy, chosen)
            if not damaged:
                what = ", ".join(rolled_back) or "nothing (the snapshot holds the same rows)"
                if not force:
                    raise HealthyLakeError(
                        f"lake {db_path} is healthy (lake check: ok); restoring {chosen.name} would roll back: {what}; "
                        "pass --force to restore it anyway (the current file is kept beside it)")
                log(f"lake {db_path} is healthy; restoring {chosen.name} rolls back: {what}")
        aside = _put_aside(db_path, held, "damaged" if damaged else "replaced") if held is not None else None
        tmp = db_path.with_name(f".{db_path.name}.restore")
        shutil.copyfile(chosen, tmp)
        os.replace(tmp, db_path)  # the path always names a whole lake: the old one or the restored one
    return Restored(chosen, aside, damaged, rolled_back)


@contextmanager
def _exclusive(db_path: Path, lock_timeout_s: float) -> Iterator[BinaryIO | None]:
    """The lake file opened and locked as DuckDB locks it for writing (an fcntl write lock on the whole file): no
    DuckDB connection, read-only or not, opens it meanwhile. None when there is no lake. The lock belongs to this
    open file: nothing in this process may open and close the lake file while it is held (POSIX drops a process's
    locks on the first close), so the lake is read through ``held`` only."""
    import fcntl

    from finpipe.market.lake import LakeLockedError

    if not db_path.exists():
        yield None
        return
    held = open(db_path, "r+b")  # closed below: that is what releases the lock
    try:
        deadline = time.monotonic() + lock_timeout_s
        while True:
            try:
                fcntl.lockf(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    pid = _lock_holder(held)
                    raise LakeLockedError(
                        f"lake {db_path} is held by another process (pid {pid or 'unknown'}): restoring now would lose "
                        "what it writes; run the restore again once that process is done", pid) from None
                time.sleep(0.1)
        yield held
    finally:
        held.close()


def _lock_holder(held: BinaryIO) -> int | None:
    """The PID holding a conflicting lock on ``held`` (fcntl F_GETLK; Linux's struct flock layout), if known."""
    import fcntl
    import struct

    layout = "hhqqi4x"  # l_type, l_whence, l_start, l_len, l_pid
    try:
        answer = fcntl.fcntl(held.fileno(), fcntl.F_GETLK, struct.pack(layout, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        kind, _, _, _, pid = struct.unpack(layout, answer)
    except (OSError, struct.error):
        return None
    return pid if kind != fcntl.F_UNLCK and pid > 0 else None


def _wal(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".wal")


@contextmanager
def _private_copy(held: BinaryIO, db_path: Path) -> Iterator[Path]:
    """A temporary copy of the locked lake (and its write-ahead log) to check and compare: DuckDB must not open the
    lake file itself in this process while the lock is held (see ``_exclusive``)."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    copy = db_path.with_name(f".{db_path.name}.check-{stamp}")
    try:
        held.seek(0)
        with open(copy, "wb") as out:
            shutil.copyfileobj(held, out, 1 << 20)
        if _wal(db_path).exists():
            shutil.copyfile(_wal(db_path), _wal(copy))
        yield copy
    finally:
        copy.unlink(missing_ok=True)
        _wal(copy).unlink(missing_ok=True)


def _put_aside(db_path: Path, held: BinaryIO, what: str) -> Path:
    """Keep the lake being replaced as ``<name>.<what>-<time>`` (with its write-ahead log): a second name for the same
    file, so the lake's own path never goes missing (a process that opened it then would create an empty lake)."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    aside = db_path.with_name(f"{db_path.name}.{what}-{stamp}")
    try:
        os.link(db_path, aside)
    except OSError:  # a file system without hard links: a copy, read through the locked file
        held.seek(0)
        with open(aside, "wb") as out:
            shutil.copyfileobj(held, out, 1 << 20)
    if _wal(db_path).exists():
        _wal(db_path).rename(_wal(aside))
    return aside


def _contents(db_path: Path) -> tuple[dict[str, int], object, set[str]]:
    """(rows per table, newest price date, model run ids) of a lake file."""
    from finpipe.market.lake import PriceLake

    with PriceLake(db_path).connect(read_only=True) as con:
        tables = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
        counts = {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchall()[0][0] for t in tables}
        newest = con.execute("SELECT max(date) FROM prices").fetchall()[0][0] if "prices" in tables else None
        runs = {r[0] for r in con.execute("SELECT run_id FROM model_runs").fetchall()} if "model_runs" in tables \
            else set()
    return counts, newest, runs


def _rolled_back(current: Path, snapshot_path: Path) -> list[str]:
    """What replacing ``current`` by ``snapshot_path`` would undo: each table whose rows differ, the newest price date,
    the model runs the snapshot does not know."""
    (now, newest_now, runs_now), (then, newest_then, runs_then) = _contents(current), _contents(snapshot_path)
    changes = [f"{t} {n:,} -> {then[t]:,} rows" if t in then else f"{t} ({n:,} rows; not in the snapshot)"
               for t, n in sorted(now.items()) if then.get(t) != n]
    if newest_now != newest_then:
        changes.append(f"prices up to {newest_now} -> up to {newest_then}")
    if runs_now - runs_then:
        changes.append(f"model runs newer than the snapshot: {', '.join(sorted(runs_now - runs_then))}")
    return changes
