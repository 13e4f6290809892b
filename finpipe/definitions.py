"""The finpipe Dagster code location: every definition under ``finpipe/defs`` (autoloaded, as ``dg`` projects do),
merged with the resources and the executor. ``dagster dev -w workspace.yaml``, ``dg dev``, ``dg check defs`` and
``dg list defs`` all load ``defs`` from here.

Groups follow the lineage: market_data → statistics → datasets → models → evaluation, plus the optional scratch
model and the studies. ``in_groups`` hands out a group's assets and their checks (the CLI's stages use it).
"""

import multiprocessing
import warnings
from pathlib import Path

import dagster as dg

import finpipe.defs
from finpipe.defs import jobs
from finpipe.defs.console import LOGGERS
from finpipe.defs.resources import LAKE_WRITER_LIMITS, build_resources

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


def _dg_project_root() -> Path | None:
    """The checkout whose pyproject declares the dg project, or None (an installed wheel carries no pyproject)."""
    for folder in Path(__file__).resolve().parents:
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file():
            return folder if "[tool.dg]" in pyproject.read_text(encoding="utf-8") else None
    return None


def autoloaded() -> dg.Definitions:
    """Every asset, check, job, schedule and sensor defined at module level under ``finpipe/defs``: loaded as the dg
    project's defs folder where its configuration (pyproject's ``[tool.dg]``) is at hand, else from the package."""
    project_root = _dg_project_root()
    if project_root is not None:
        return dg.load_from_defs_folder(project_root=project_root)
    with warnings.catch_warnings():  # preview status of the fallback loader: not the user's concern
        warnings.simplefilter("ignore")
        return dg.load_definitions_from_package_module(finpipe.defs)


def definitions_with_executor(executor) -> dg.Definitions:
    """finpipe's definitions run by ``executor`` (deploy/ swaps in the Kubernetes or Celery executor; locally it is
    ``multiprocess_lake_safe``)."""
    return dg.Definitions.merge(autoloaded(), dg.Definitions(resources=build_resources(), executor=executor,
                                                             loggers=LOGGERS))


defs = definitions_with_executor(multiprocess_lake_safe)


def in_groups(*groups: str) -> list:
    """The assets of ``groups`` and every check that targets them, to pass to ``dg.materialize``."""
    assets = [a for a in defs.assets if set(a.group_names_by_key.values()) & set(groups)]
    keys = {k for a in assets for k in a.keys}
    checks = [c for c in defs.asset_checks if {k.asset_key for k in c.check_keys} & keys]
    return [*assets, *checks]


def job_with_resources(name: str, resources: dict) -> dg.JobDefinition:
    """The named job ``name`` over every loaded asset and check, bound to ``resources`` (the CLI's, built after it
    set the environment for this run), to run in process."""
    return dg.Definitions(assets=list(defs.assets or []), asset_checks=list(defs.asset_checks or []),
                          jobs=[job for job in defs.jobs or [] if job.name == name],
                          resources=resources, loggers=LOGGERS).resolve_job_def(name)


def train_evaluate_promote() -> dg.JobDefinition:
    """The model stage's job as the code location resolves it (its resources, the lake-safe multiprocess executor):
    ``dg.reconstructable`` needs a module-level function, which each step process imports again."""
    return defs.resolve_job_def(jobs.TRAIN_EVALUATE_PROMOTE)


def build_datasets() -> dg.JobDefinition:
    """The data stage's job, for ``dg.reconstructable``: its quality gates import Great Expectations and pandas, which
    then stay out of the ``finpipe run`` process."""
    return defs.resolve_job_def(jobs.BUILD_DATASETS)
