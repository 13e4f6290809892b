"""Where finpipe keeps what it generates.

Everything generated lives under one lake directory (default: ``data_lake/`` in the repository),
overridable with ``FINPIPE_LAKE_DIR`` so tests and several checkouts never share files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LAKE_DB_NAME = "finpipe.duckdb"


def lake_dir() -> Path:
    configured = os.environ.get("FINPIPE_LAKE_DIR")
    folder = Path(configured).expanduser().resolve() if configured else REPO_ROOT / "data_lake"
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"the lake folder {folder} (FINPIPE_LAKE_DIR) is a file, not a folder: point "
                                 "FINPIPE_LAKE_DIR at a folder")
    return folder


def writable_lake_dir() -> Path:
    """The lake folder, created if needed, after checking that this user can write into it."""
    folder = lake_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"cannot create the lake folder {folder} (FINPIPE_LAKE_DIR): {exc.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"the lake folder {folder} (FINPIPE_LAKE_DIR) is not writable by this user: choose "
                              "another folder or fix its permissions")
    return folder


def lake_db_path() -> Path:
    return lake_dir() / LAKE_DB_NAME


def dagster_home() -> Path:
    """Dagster's instance directory (run history, event logs) for `finpipe run` and `finpipe ui`."""
    configured = os.environ.get("DAGSTER_HOME")
    return Path(configured).resolve() if configured else lake_dir() / "dagster_home"


@dataclass(frozen=True)
class DatasetFiles:
    """The datasets' files inside a lake folder, declared once: the Dagster assets write them, and the CLI, the
    export's lineage and the benchmarks read them from here."""

    root: Path  # <lake>/datasets

    @classmethod
    def of(cls, lake: Path | str) -> "DatasetFiles":
        return cls(Path(lake) / "datasets")

    @property
    def samples(self) -> Path:
        return self.root / "samples.jsonl"

    @property
    def samples_manifest(self) -> Path:
        return self.root / "samples.manifest.json"

    @property
    def gate_report(self) -> Path:
        """The verdict of the gates on ``samples`` (a GE validation result plus finpipe's digest)."""
        return self.root / "validation" / "instruction_samples.json"

    @property
    def split_dir(self) -> Path:
        return self.root / "split"

    @property
    def train(self) -> Path:
        return self.split_dir / "train.jsonl"

    @property
    def val(self) -> Path:
        return self.split_dir / "val.jsonl"

    @property
    def split_manifest(self) -> Path:
        """split.json: the cutoff, the counts and the digests of train.jsonl and val.jsonl."""
        return self.split_dir / "split.json"

    @property
    def golden(self) -> Path:
        """The frozen golden evaluation set (written once by the evaluation asset)."""
        return self.root / "golden.jsonl"
