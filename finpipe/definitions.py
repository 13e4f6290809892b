"""The finpipe Dagster code location (``dagster dev -w workspace.yaml`` loads ``defs``)."""

import dagster as dg

from finpipe.defs.market_data import daily_prices, market_data_checks
from finpipe.defs.resources import LakeResource, MarketDataResource


def build_resources() -> dict:
    return {"lake": LakeResource(), "market_data": MarketDataResource.from_env()}


defs = dg.Definitions(
    assets=[daily_prices],
    asset_checks=market_data_checks,
    resources=build_resources(),
)
