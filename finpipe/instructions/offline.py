"""Grounded samples built straight from the offline replay (no lake, no Dagster): a dataset for tests, benchmarks
and quick experiments, identical to what the pipeline builds from the same dates and spec."""

from __future__ import annotations

import datetime as dt
from functools import lru_cache

from finpipe.instructions.builder import DatasetSpec, build_samples
from finpipe.instructions.samples import Sample

FIRST, LAST = dt.date(2011, 3, 1), dt.date(2013, 3, 1)


@lru_cache(maxsize=4)
def replay_inputs(first: dt.date = FIRST, last: dt.date = LAST):
    """(statistics, prices, names) of the us_core universe from the replay source, ``first`` .. ``last``."""
    from finpipe.market.ingest import IngestRequest, ingest
    from finpipe.market.sources import ReplaySource
    from finpipe.market.universes import US_CORE
    from finpipe.statistics.compute import compute_statistics

    batch = ingest(ReplaySource(), IngestRequest(US_CORE, first, last))
    return compute_statistics(batch.clean), batch.clean, {t.symbol: t.name for t in US_CORE.tickers}


def offline_samples(first: dt.date = FIRST, last: dt.date = LAST, **spec) -> list[Sample]:
    """The grounded samples of the replay's ``first`` .. ``last`` (``spec``: DatasetSpec fields)."""
    return build_samples(*replay_inputs(first, last), DatasetSpec(**spec))
