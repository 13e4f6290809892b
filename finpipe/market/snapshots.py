"""Copies of the lake file after each successful run, a check, and a restore: a damaged lake loses at most the
last run, never the run registry, the champion's history or the ingest log (which no source can rebuild).

A snapshot is a byte copy of ``finpipe.duckdb`` taken while a read-only connection holds the file (so no writer is
mid-write), kept in ``<lake>/snapshots/`` (the newest ``KEEP``). ``restore`` moves the damaged file aside, never
deleting it, and copies the chosen snapshot into place.
"""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass
from pathlib import Path

KEEP = 3
FOLDER = "snapshots"


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


def check(db_path: Path) -> LakeHealth:
    """Open the lake read-only and count every table's rows: a damaged file fails here, with the reason."""
    from finpipe.market.lake import CorruptLakeError, PriceLake

    try:
        with PriceLake(db_path, lock_timeout_s=5.0).connect(read_only=True) as con:
            names = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables "
                                               "ORDER BY table_name").fetchall()]
            # hashing each whole row reads every block (count(*) alone can be answered from metadata)
            counts = {n: con.execute(f'SELECT count(*), max(hash(t)) FROM "{n}" AS t').fetchall()[0][0]
                      for n in names}
    except CorruptLakeError as exc:
        return LakeHealth(Path(db_path), False, {}, str(exc))
    except Exception as exc:  # a file that opens but cannot be read through
        return LakeHealth(Path(db_path), False, {}, f"{type(exc).__name__}: {exc}")
    return LakeHealth(Path(db_path), True, counts)


def restore(db_path: Path, snapshot_path: Path | None = None) -> tuple[Path, Path | None]:
    """Put a snapshot (the newest that passes ``check`` by default) in place of the lake; the current file, if any,
    is kept beside it as ``<name>.broken-<time>``. Returns (restored from, moved aside)."""
    db_path = Path(db_path)
    candidates = [Path(snapshot_path)] if snapshot_path else list_snapshots(db_path)
    chosen = next((c for c in candidates if c.exists() and check(c).ok), None)
    if chosen is None:
        raise FileNotFoundError(f"no readable snapshot of {db_path} in {snapshots_dir(db_path)}")
    aside = None
    if db_path.exists():
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        aside = db_path.with_name(f"{db_path.name}.broken-{stamp}")
        db_path.rename(aside)
        wal = db_path.with_name(db_path.name + ".wal")
        if wal.exists():
            wal.rename(aside.with_name(aside.name + ".wal"))
    tmp = db_path.with_name(f".{db_path.name}.restore")
    shutil.copyfile(chosen, tmp)
    tmp.replace(db_path)
    return chosen, aside
