"""Dagster resources: where the lake is, which market data source feeds it, and whether MLflow tracks the models.

Source selection is explicit: ``FINPIPE_SOURCE`` (replay | yahoo | simulated) overrides the default
``replay``; there is no silent fallback from one source to another.
"""


import dataclasses
import datetime as dt
import os
from pathlib import Path

import dagster as dg
from pydantic import field_validator

from finpipe import paths
from finpipe.defs.config import config_class
from finpipe.market.lake import PriceLake
from finpipe.market.sources import REPLAY_LAST_DATE, SOURCE_KINDS, PriceSource, make_source
from finpipe.market.universes import UNIVERSES, Universe, get_universe
from finpipe.tracking import ENVIRONMENT, TrackingSpec

#: DuckDB admits one writing process per lake file. Every asset that writes the lake is in this Dagster pool and
#: carries LAKE_WRITER_TAGS: the executor's tag limit (LAKE_WRITER_LIMITS, finpipe.definitions) keeps two writers
#: of one run apart, an instance pool limit (`concurrency: pools:` in dagster.yaml, or
#: `dagster instance concurrency set finpipe_lake 1`) keeps writers of different runs apart. Readers are not
#: limited: PriceLake.connect waits up to lock_timeout_s for a writer to finish.
LAKE_WRITER_POOL = "finpipe_lake"
LAKE_WRITER_TAGS = {"finpipe/lake": "writer"}
LAKE_WRITER_LIMITS = [{"key": "finpipe/lake", "value": "writer", "limit": 1}]


class LakeResource(dg.ConfigurableResource):
    """The DuckDB lake file under the lake directory (``FINPIPE_LAKE_DIR``, default ``data_lake/``)."""

    lake_dir: str = ""
    lock_timeout_s: float = 30.0

    @property
    def directory(self) -> Path:
        return Path(self.lake_dir).resolve() if self.lake_dir else paths.lake_dir()

    @property
    def db_path(self) -> Path:
        return self.directory / paths.LAKE_DB_NAME

    def prices_lake(self) -> PriceLake:
        return PriceLake(self.db_path, lock_timeout_s=self.lock_timeout_s)


class MarketDataResource(dg.ConfigurableResource):
    """Which prices to ingest, and from where."""

    source: str = "replay"
    universe: str = "us_core"
    # Optional explicit ticker list: replaces the universe's tickers (unknown symbols are traded on the
    # universe's calendar), e.g. ["AAPL", "MSFT"].
    tickers: list[str] = []
    replay_as_of: str = REPLAY_LAST_DATE.isoformat()
    simulation_seed: int = 7
    # an explicit volatility shock of the simulated source (tests, demos of drift-aware retraining): from this
    # ISO date on, the annual volatility is multiplied by simulation_shock_volatility; empty: no shock
    simulation_shock_from: str = ""
    simulation_shock_volatility: float = 1.0
    yahoo_timeout_s: float = 10.0
    yahoo_max_attempts: int = 3
    yahoo_backoff_s: float = 2.0
    yahoo_deadline_s: float = 90.0  # the whole download, all attempts
    yahoo_proxy: str = ""  # e.g. http://proxy.corp:3128; empty = direct
    # When every ticker fails from a live source, let Dagster's retry policy rerun the step.
    retry_when_all_fail: bool = True

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value not in SOURCE_KINDS:
            raise ValueError(f"unknown price source {value!r}; choose one of {', '.join(SOURCE_KINDS)}")
        return value

    @field_validator("universe")
    @classmethod
    def _known_universe(cls, value: str) -> str:
        if value not in UNIVERSES:
            raise ValueError(f"unknown universe {value!r}; known universes: {', '.join(sorted(UNIVERSES))}")
        return value

    @field_validator("replay_as_of")
    @classmethod
    def _iso_date(cls, value: str) -> str:
        try:
            dt.date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"replay_as_of must be an ISO date (YYYY-MM-DD), got {value!r}") from None
        return value

    @field_validator("simulation_shock_from")
    @classmethod
    def _iso_date_or_empty(cls, value: str) -> str:
        try:
            return dt.date.fromisoformat(value).isoformat() if value else value
        except ValueError:
            raise ValueError(f"simulation_shock_from must be an ISO date (YYYY-MM-DD) or empty, got {value!r}") from None

    @field_validator("yahoo_timeout_s", "yahoo_backoff_s", "yahoo_deadline_s", "simulation_shock_volatility")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"must be > 0, got {value}")
        return value

    @field_validator("yahoo_max_attempts")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be >= 1, got {value}")
        return value

    @classmethod
    def from_env(cls) -> "MarketDataResource":
        return cls(
            source=os.environ.get("FINPIPE_SOURCE", "replay"),
            universe=os.environ.get("FINPIPE_UNIVERSE", "us_core"),
            tickers=[t.strip() for t in os.environ.get("FINPIPE_TICKERS", "").split(",") if t.strip()],
            replay_as_of=os.environ.get("FINPIPE_REPLAY_AS_OF", REPLAY_LAST_DATE.isoformat()),
            simulation_shock_from=os.environ.get("FINPIPE_SIMULATION_SHOCK_FROM", ""),
            simulation_shock_volatility=float(os.environ.get("FINPIPE_SIMULATION_SHOCK_VOLATILITY", "1.0")),
            # a proxy URL may carry credentials (http://user:password@host): resolved at run time, never stored
            yahoo_proxy=dg.EnvVar("FINPIPE_YAHOO_PROXY") if os.environ.get("FINPIPE_YAHOO_PROXY") else "",
        )

    def get_universe(self) -> Universe:
        return get_universe(self.universe).restricted_to(self.tickers) if self.tickers else get_universe(self.universe)

    def price_source(self) -> PriceSource:
        return make_source(
            self.source,
            calendar=self.get_universe().calendar,
            replay_as_of=dt.date.fromisoformat(self.replay_as_of),
            simulation_seed=self.simulation_seed,
            simulation_shock_from=(dt.date.fromisoformat(self.simulation_shock_from)
                                   if self.simulation_shock_from else None),
            simulation_shock_volatility=self.simulation_shock_volatility,
            yahoo_timeout_s=self.yahoo_timeout_s,
            yahoo_max_attempts=self.yahoo_max_attempts,
            yahoo_backoff_s=self.yahoo_backoff_s,
            yahoo_proxy=self.yahoo_proxy,
            yahoo_deadline_s=self.yahoo_deadline_s,
        )


class HuggingFaceResource(dg.ConfigurableResource):
    """Credentials for gated hub models (e.g. meta-llama/Llama-3.2-1B-Instruct): HF_TOKEN, never in config files."""

    token: str = ""


class TrackingResource(config_class(TrackingSpec, "TrackingSettings", base=dg.ConfigurableResource)):
    """MLflow tracking of the models (``finpipe.tracking``): off unless ``enabled``; the fields are
    ``TrackingSpec``'s, each with its environment variable (``FINPIPE_MLFLOW``, ``FINPIPE_MLFLOW_TRACKING_URI``...)."""

    @classmethod
    def from_env(cls) -> "TrackingResource":
        spec = TrackingSpec.from_env()
        fields = dataclasses.asdict(spec)
        # a tracking server's URI may carry credentials (http://user:password@host): resolved at run time, never stored
        for variable in (ENVIRONMENT["tracking_uri"], "MLFLOW_TRACKING_URI"):
            if os.environ.get(variable, "").strip() == spec.tracking_uri and spec.tracking_uri:
                fields["tracking_uri"] = dg.EnvVar(variable)
                break
        return cls(**fields)

    def spec(self) -> TrackingSpec:
        return TrackingSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrackingSpec)})


def build_resources() -> dict:
    """The resources every finpipe asset runs with (secrets only from the environment, as ``dg.EnvVar``)."""
    token = dg.EnvVar("HF_TOKEN") if os.environ.get("HF_TOKEN") else ""
    return {
        "lake": LakeResource(),
        "market_data": MarketDataResource.from_env(),
        "huggingface": HuggingFaceResource(token=token),
        "tracking": TrackingResource.from_env(),
    }
