"""The finpipe Dagster code location (``dagster dev -w workspace.yaml`` loads ``defs``)."""

import multiprocessing
import os

import dagster as dg

from finpipe.defs.automation import nightly_retrain, nightly_schedule, refresh_on_new_prices
from finpipe.defs.datasets import dataset_checks, dataset_split, instruction_samples
from finpipe.defs.evaluation import evaluation_assets, evaluation_checks
from finpipe.defs.market_data import daily_prices, market_data_checks
from finpipe.defs.models import HuggingFaceResource, base_model, qlora_adapter, scratch_gpt
from finpipe.defs.resources import LAKE_WRITER_LIMITS, LakeResource, MarketDataResource
from finpipe.defs.statistics import price_statistics, statistics_sane
from finpipe.defs.studies import study_assets

#: everything downstream of the partitioned prices up to the training data
DERIVED_ASSETS = [price_statistics, instruction_samples, dataset_split]
DERIVED_CHECKS = [statistics_sane, *dataset_checks]
#: models: base (embedded SmolLM2 by default), the adapter, its evaluation, report and promotion;
#: scratch_gpt is the optional own GPT
MODEL_ASSETS = [base_model, qlora_adapter, *evaluation_assets]
MODEL_CHECKS = evaluation_checks

#: Launched runs (UI, schedule, sensor, `dagster job launch`) run each step in its own process, as many at once as
#: there are CPUs, but never two lake writers at once (DuckDB: one writing process per file). Step processes fork
#: from a forkserver that has imported Dagster and this module once (seconds faster per step than spawn; spawn where
#: there is no forkserver). `materialize()` and `execute_in_process()` stay in-process.
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _lake_safe(config: dict) -> dict:
    return {"max_concurrent": config.get("max_concurrent", 0), "tag_concurrency_limits": LAKE_WRITER_LIMITS,
            "start_method": {START_METHOD: {}}}


multiprocess_lake_safe = dg.multiprocess_executor.configured(
    _lake_safe, name="multiprocess_lake_safe",
    config_schema={"max_concurrent": dg.Field(int, default_value=0, description="steps at once; 0 = one per CPU")})


def build_resources() -> dict:
    token = dg.EnvVar("HF_TOKEN") if os.environ.get("HF_TOKEN") else ""  # secrets only from the environment
    return {
        "lake": LakeResource(),
        "market_data": MarketDataResource.from_env(),
        "huggingface": HuggingFaceResource(token=token),
    }


def definitions_with_executor(executor) -> dg.Definitions:
    """finpipe's assets, checks, jobs, schedule, sensor and resources run by ``executor`` (deploy/ swaps in the
    Kubernetes or Celery executor; locally it is ``multiprocess_lake_safe``)."""
    return dg.Definitions(
        assets=[daily_prices, *DERIVED_ASSETS, scratch_gpt, *MODEL_ASSETS, *study_assets],
        asset_checks=[*market_data_checks, *DERIVED_CHECKS, *MODEL_CHECKS],
        jobs=[nightly_retrain],
        schedules=[nightly_schedule],
        sensors=[refresh_on_new_prices],
        resources=build_resources(),
        executor=executor,
    )


defs = definitions_with_executor(multiprocess_lake_safe)
