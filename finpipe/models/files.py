"""Atomic folder writes: build in a temporary sibling, then rename into place. Each temporary sibling has a marker
beside it naming the process writing it, so a later write of the same target removes what a killed one left (and
only that: a folder without finpipe's marker, or one whose writer still runs, is never touched)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


@contextmanager
def atomic_dir(target: Path, discard_old: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces ``target`` in one rename, on error it is removed.

    Readers never see a half-written folder, and a failure leaves the previous ``target`` untouched. The previous
    ``target``, renamed aside, is then removed whole, or handed to ``discard_old`` (which removes what it knows).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    marker = _claim(tmp)
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{tmp.name[-8:]}")
            target.rename(old)
            tmp.rename(target)
            if discard_old is None:
                shutil.rmtree(old, ignore_errors=True)
            else:
                discard_old(old)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        marker.unlink(missing_ok=True)


@contextmanager
def scratch_dir(beside: Path, label: str) -> Iterator[Path]:
    """A temporary working folder next to ``beside`` (the same filesystem: its files can be renamed into place),
    removed on exit; one a killed process left is removed by the next write of ``beside``."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=beside.parent, prefix=f".{beside.name}.{label}-"))
    marker = _claim(folder)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        marker.unlink(missing_ok=True)


#: the marker beside a temporary folder: which process on which host writes it
WRITER_SUFFIX = ".finpipe-writer"


def _claim(folder: Path) -> Path:
    marker = folder.with_name(folder.name + WRITER_SUFFIX)
    marker.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    return marker


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove the temporary siblings of ``target`` (``atomic_dir``'s, ``scratch_dir``'s) whose writer died (a SIGKILL,
    a power cut). Only folders with finpipe's marker whose process no longer runs on this host are removed: a marker
    from another host (a shared volume) cannot be checked and is left alone. Returns the folders removed."""
    removed = []
    host = socket.gethostname()
    for marker in target.parent.glob(f".{glob.escape(target.name)}.*{WRITER_SUFFIX}"):
        try:
            writer = json.loads(marker.read_text())
            pid = int(writer["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a marker finpipe wrote
        if writer.get("host") != host or _running(pid):
            continue
        folder = marker.with_name(marker.name.removesuffix(WRITER_SUFFIX))
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        marker.unlink(missing_ok=True)
    return removed


def read_json_or_empty(path: Path) -> dict:
    """A JSON file's object, or {} when the file is missing or unreadable (a manifest a lake may not have yet)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content (hex, first 16 characters)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file through a temp sibling and one rename: readers see the old or the new content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
