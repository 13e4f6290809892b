"""Shared fixtures. Every test gets its own lake directory and never writes into the repo's data_lake/."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def isolated_lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    lake_dir = tmp_path / "lake"
    monkeypatch.setenv("FINPIPE_LAKE_DIR", str(lake_dir))
    for var in ("FINPIPE_SOURCE", "FINPIPE_UNIVERSE", "FINPIPE_REPLAY_AS_OF", "DAGSTER_HOME"):
        monkeypatch.delenv(var, raising=False)
    return lake_dir


@pytest.fixture
def lake_resources(isolated_lake: Path):
    """Dagster resources over the test's own lake; call with MarketDataResource overrides."""
    from finpipe.defs.resources import LakeResource, MarketDataResource

    def build(**market):
        return {"lake": LakeResource(lake_dir=str(isolated_lake)), "market_data": MarketDataResource(**market)}

    return build


def d(text: str) -> dt.date:
    return dt.date.fromisoformat(text)
