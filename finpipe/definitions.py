"""The finpipe Dagster code location (``dagster dev -w workspace.yaml`` loads ``defs``)."""

import dagster as dg

from finpipe.defs.datasets import dataset_checks, dataset_split, instruction_samples
from finpipe.defs.market_data import daily_prices, market_data_checks
from finpipe.defs.resources import LakeResource, MarketDataResource
from finpipe.defs.statistics import price_statistics, statistics_sane

#: everything downstream of the partitioned prices, materialized together after ingestion
DERIVED_ASSETS = [price_statistics, instruction_samples, dataset_split]
DERIVED_CHECKS = [statistics_sane, *dataset_checks]


def build_resources() -> dict:
    return {"lake": LakeResource(), "market_data": MarketDataResource.from_env()}


defs = dg.Definitions(
    assets=[daily_prices, *DERIVED_ASSETS],
    asset_checks=[*market_data_checks, *DERIVED_CHECKS],
    resources=build_resources(),
)
