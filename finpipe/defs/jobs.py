"""The named jobs ``finpipe run`` launches, one per stage of the lineage, so the Runs page and the timeline read like
the lineage instead of a column of ``__ephemeral_asset_job__``. Each selects whole groups, their asset checks
included (the blocking gates run in the same run as the asset they guard).

- ``ingest_prices``: the partitioned daily prices (``market_data``);
- ``build_datasets``: statistics, instruction samples and the train/validation split (``statistics``, ``datasets``);
- ``pretrain_scratch_gpt``: finpipe's own small GPT, only for ``--base scratch`` (``scratch``);
- ``train_evaluate_promote``: base model, adapter, evaluation, report and promotion (``models``, ``evaluation``).

The nightly job (``nightly_retrain``) is in ``automation``; the studies' assets run as their own materializations.
"""

import dagster as dg

INGEST_PRICES = "ingest_prices"
BUILD_DATASETS = "build_datasets"
PRETRAIN_SCRATCH_GPT = "pretrain_scratch_gpt"
TRAIN_EVALUATE_PROMOTE = "train_evaluate_promote"

#: each job's asset groups, in lineage order
STAGE_GROUPS: dict[str, tuple[str, ...]] = {
    INGEST_PRICES: ("market_data",),
    BUILD_DATASETS: ("statistics", "datasets"),
    PRETRAIN_SCRATCH_GPT: ("scratch",),
    TRAIN_EVALUATE_PROMOTE: ("models", "evaluation"),
}

ingest_prices = dg.define_asset_job(
    INGEST_PRICES, selection=dg.AssetSelection.groups(*STAGE_GROUPS[INGEST_PRICES]),
    description="Daily prices from the configured source into the DuckDB lake, one partition per weekday "
                "(`finpipe run` ingests its whole range in one run).")
build_datasets = dg.define_asset_job(
    BUILD_DATASETS, selection=dg.AssetSelection.groups(*STAGE_GROUPS[BUILD_DATASETS]),
    description="Statistics, grounded instruction samples behind their quality gates, and the train/validation "
                "split without look-ahead.")
pretrain_scratch_gpt = dg.define_asset_job(
    PRETRAIN_SCRATCH_GPT, selection=dg.AssetSelection.groups(*STAGE_GROUPS[PRETRAIN_SCRATCH_GPT]),
    description="Pretrain finpipe's own small GPT (only for `--base scratch`).")
train_evaluate_promote = dg.define_asset_job(
    TRAIN_EVALUATE_PROMOTE, selection=dg.AssetSelection.groups(*STAGE_GROUPS[TRAIN_EVALUATE_PROMOTE]),
    description="Base model, adapter, evaluation, report and promotion; each step in its own process, so the "
                "memory of training is gone before the evaluation starts.")
