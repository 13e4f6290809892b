"""Where finpipe keeps what it generates.

Everything generated lives under one lake directory (default: ``data_lake/`` in the repository),
overridable with ``FINPIPE_LAKE_DIR`` so tests and several checkouts never share files.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LAKE_DB_NAME = "finpipe.duckdb"


def lake_dir() -> Path:
    configured = os.environ.get("FINPIPE_LAKE_DIR")
    return Path(configured).resolve() if configured else REPO_ROOT / "data_lake"


def lake_db_path() -> Path:
    return lake_dir() / LAKE_DB_NAME


def dagster_home() -> Path:
    """Dagster's instance directory (run history, event logs) for `finpipe run` and `finpipe ui`."""
    configured = os.environ.get("DAGSTER_HOME")
    return Path(configured).resolve() if configured else lake_dir() / "dagster_home"
