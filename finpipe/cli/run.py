"""`finpipe run`, `study` and `ui`: the pipeline as Dagster runs, with one line (and the right exit code) for a
failure that explains itself, and the console filtering that makes it so."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import sys
import time
from pathlib import Path

from finpipe import paths
from finpipe.cli import EXIT_BAD_INPUT, EXIT_LAKE_CORRUPT, EXIT_LAKE_LOCKED

# thirteen years of sessions: calm and stressed markets (2000-02, 2008), so every label value of the rules is taught
DEFAULT_HISTORY_DAYS = 13 * 365 + 3


#: the instance config finpipe writes: telemetry off; the logs Dagster writes outside a run's own loggers (a step
#: process announcing itself) at INFO, not DEBUG, like the console logger of `finpipe run`
INSTANCE_CONFIG = "telemetry:\n  enabled: false\npython_logs:\n  python_log_level: INFO\n"
PREVIOUS_INSTANCE_CONFIGS = ("telemetry:\n  enabled: false\n",)


def _prepare_dagster_home() -> Path:
    """A persistent Dagster instance under the lake, so `finpipe run` history shows in `finpipe ui`."""
    home = paths.dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists() or config.read_text() in PREVIOUS_INSTANCE_CONFIGS:  # only a file finpipe wrote itself
        config.write_text(INSTANCE_CONFIG)
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
    _event_log_without_fsync()
    return home


#: the libraries' own switches for their progress bars (huggingface_hub and transformers, datasets, any other tqdm)
PROGRESS_BAR_SWITCHES = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")


def _quiet_progress_bars(verbose: bool) -> None:
    """No library progress bars (weight loading, dataset maps, GGUF conversion) unless ``--verbose``: finpipe says
    what each long step is doing itself, with the time left. Set in the environment, so that every step process
    inherits it; a variable the user set stays as it is."""
    if not verbose:
        for name in PROGRESS_BAR_SWITCHES:
            os.environ.setdefault(name, "1")


def _event_log_without_fsync() -> None:
    """Dagster's SQLite run history without an fsync per commit, in this process only.

    A full ingest writes thousands of events (two per daily partition), and the fsyncs were half of its time
    (docs/operations.md). A killed process loses nothing (the writes are with the OS); an OS crash or power cut
    could damage the run history under data_lake/dagster_home, never the lake (DuckDB) or the models."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if not event.contains(Engine, "connect", _sqlite_without_fsync):
        event.listen(Engine, "connect", _sqlite_without_fsync)


def _sqlite_without_fsync(dbapi_connection, _record) -> None:
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA synchronous=OFF")
        cursor.close()


def _parse_date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date (YYYY-MM-DD): {value!r}") from None


def cmd_run(args: argparse.Namespace) -> int:
    """Materialize the pipeline on the configured source (default: the offline replay)."""
    paths.writable_lake_dir()  # a file or a read-only folder: one line now, not a traceback mid-run
    _prepare_dagster_home()
    if args.source:
        os.environ["FINPIPE_SOURCE"] = args.source
    if args.universe:
        os.environ["FINPIPE_UNIVERSE"] = args.universe
    if args.tickers:
        os.environ["FINPIPE_TICKERS"] = args.tickers
    tracking_from_options(args)

    import dagster as dg

    from finpipe.defs import jobs
    from finpipe.defs.partitions import PARTITION_RANGE_END_TAG, PARTITION_RANGE_START_TAG
    from finpipe.defs.resources import build_resources

    resources = build_resources()
    ops = _checked_model_ops(args, resources)  # a mistake in --config or the options: now, not after the ingest
    market = resources["market_data"].process_config_and_initialize()  # resolves EnvVar fields (the proxy)
    source = market.price_source()
    end = args.end or source.available_until() or dt.date.today()
    start = args.start or end - dt.timedelta(days=DEFAULT_HISTORY_DAYS)
    if end < start:
        print(f"error: --end {end} is before --start {start}", file=sys.stderr)
        return 2
    first_key, last_key = _partition_keys(start, end)
    instance = dg.DagsterInstance.get()
    run_config = {"loggers": {"console": {"config": {"log_level": args.log_level, "verbose": args.verbose}}}}
    _quiet_progress_bars(args.verbose)

    # Run 1: the partitioned prices, the whole range in one run. Run 2: everything derived from them.
    # Run 3: base model, adapter, evaluation, report and promotion.
    print(f"finpipe: [1/3] ingesting {market.universe} from {source.name}, {first_key} .. {last_key}")
    # Dagster writes two events per daily partition before and after the step's own work (3,393 partitions: ~40 s
    # of the ingest's 43 on 2 cores, with no line of its own): say so, every 15 s
    from finpipe.runtime import heartbeat

    partitions = _weekdays(dt.date.fromisoformat(first_key), dt.date.fromisoformat(last_key))
    with heartbeat(lambda line: print(f"{time.strftime('%H:%M:%S')} {jobs.INGEST_PRICES}: {line}", flush=True),
                   f"Dagster records {partitions:,} daily partitions"):
        ingest = _run_in_process(jobs.INGEST_PRICES, resources, instance, run_config,
                                 tags={PARTITION_RANGE_START_TAG: first_key, PARTITION_RANGE_END_TAG: last_key})
    if code := _report(ingest, "ingestion"):
        return code
    lake = resources["lake"]
    per_ticker = lake.prices_lake().query(
        "SELECT ticker, count(*) AS rows, min(date) AS first, max(date) AS last, any_value(source) AS source "
        "FROM prices GROUP BY ticker ORDER BY ticker")
    for row in per_ticker.iter_rows(named=True):  # one line each: a table would wrap in a narrow terminal
        print(f"  {row['ticker']:<8} {row['rows']:>6,} sessions  {row['first']} .. {row['last']}  ({row['source']})")
    print(f"lake: {lake.db_path}")
    if args.only_lake:
        _snapshot_after_run()
        return 0

    print("finpipe: [2/3] statistics, instruction samples (quality gates), train/validation split")
    derived = _run_in_own_processes(jobs.BUILD_DATASETS, instance, run_config)
    if code := _report(derived, "derived assets"):
        return code
    split = derived.asset_materializations_for_node("dataset_split")[0].metadata
    print(f"datasets: {split['train_samples'].value} train / {split['val_samples'].value} val samples, "
          f"cutoff {split['cutoff'].value}")
    print(f"train: {split['train_path'].value}")
    print(f"val:   {split['val_path'].value}")
    if args.only_data:
        _snapshot_after_run()
        return 0

    scratch_ops = {"ops": {"scratch_gpt": ops.pop("scratch_gpt")}} if "scratch_gpt" in ops else {}
    if args.base == "scratch":  # finpipe's own GPT is pretrained first, in its own run
        print("finpipe: pretraining finpipe's own GPT (scratch_gpt)")
        if code := _report(_run_in_process(jobs.PRETRAIN_SCRATCH_GPT, resources, instance,
                                           run_config | scratch_ops), "scratch GPT"):
            return code
    training = ops["qlora_adapter"]["config"]
    budget = [f"{training['max_minutes']} min" if "max_minutes" in training else None,
              f"{training['max_steps']} steps" if training.get("max_steps") else None]
    print(f"finpipe: [3/3] base model ({args.base}), adapter ({training.get('quantization', 'auto')}; budget "
          f"{' / '.join(b for b in budget if b) or 'the default'}), evaluation, report, promotion")
    models = _run_in_own_processes(jobs.TRAIN_EVALUATE_PROMOTE, instance, run_config | {"ops": ops})
    if code := _report(models, "model"):
        return code
    report = _print_model_stage(models)
    _snapshot_after_run()
    print(f"report: {report}")  # the last line: the one a user opens
    return 0


def tracking_from_options(args: argparse.Namespace):
    """``--mlflow`` and ``--mlflow-tracking-uri`` into the environment, where the model stage's step processes read
    them (``FINPIPE_MLFLOW``, ``FINPIPE_MLFLOW_TRACKING_URI``); a URI turns tracking on. Checked now: tracking asked for
    without the ``[mlflow]`` extra is one line before any work, not a warning after training."""
    import importlib.util

    from finpipe.tracking import ENVIRONMENT, TrackingSpec

    if getattr(args, "mlflow_tracking_uri", None):
        os.environ[ENVIRONMENT["tracking_uri"]] = args.mlflow_tracking_uri
        args.mlflow = True
    if getattr(args, "mlflow", False):
        os.environ[ENVIRONMENT["enabled"]] = "1"
    spec = TrackingSpec.from_env()  # a malformed FINPIPE_MLFLOW* variable: ValueError, exit 2
    if spec.enabled and importlib.util.find_spec("mlflow") is None:
        raise ValueError("MLflow tracking is on (--mlflow or FINPIPE_MLFLOW) but mlflow is not installed: "
                         "pip install -e '.[mlflow]' (or turn tracking off)")
    return spec


def _run_in_process(job_name: str, resources: dict, instance, run_config: dict, tags: dict | None = None):
    """One stage's named job (``finpipe.defs.jobs``), run in this process with ``resources``: the ingest, light and
    quick, one step over the whole range of partitions, with thousands of events."""
    from finpipe.definitions import job_with_resources

    return job_with_resources(job_name, resources).execute_in_process(run_config=run_config, instance=instance,
                                                                      tags=tags, raise_on_error=False)


def _run_in_own_processes(job_name: str, instance, run_config: dict):
    """One stage's named job run by finpipe's multiprocess executor, one step at a time, each step in its own
    process: the datasets (their quality gates import Great Expectations and pandas, ~350 MB that would stay in this
    process) and the model stage (what training leaves resident is gone before the evaluation loads its models): the
    Quickstart's peak memory, docs/benchmarks.md. Steps run from the definitions as loaded in a fresh process: the
    environment (``FINPIPE_*``) set by ``cmd_run`` reaches them, in-process state does not."""
    import dagster as dg

    from finpipe import definitions

    one_at_a_time = {"execution": {"config": {"max_concurrent": 1}}}
    return dg.execute_job(dg.reconstructable(getattr(definitions, job_name)), instance=instance,
                          run_config=run_config | one_at_a_time, raise_on_error=False)


def _model_stage_ops(args: argparse.Namespace) -> dict:
    """The model stage's op config: the ``--config`` file's, overridden by the command-line options."""
    ops = _config_ops(args.config)

    def section(op: str, options: dict) -> dict:
        """The op's section with the options laid over its config; other keys stay, for the config check to see."""
        given = ops.get(op) or {}
        if not isinstance(given, dict) or not isinstance(given.get("config") or {}, dict):
            raise ValueError(f"the run config {args.config}: ops.{op} must be `config:` with settings under it")
        return given | {"config": (given.get("config") or {}) | options}

    training = ({"quantization": args.quantization} if args.quantization else {}) | (
        {"max_minutes": args.train_minutes} if args.train_minutes is not None else {}) | (
        {"max_steps": args.max_steps} if args.max_steps is not None else {}) | (
        {"warm_start": "champion"} if args.warm_start else {})
    evaluation = {"max_new_tokens": args.eval_max_new_tokens} if args.eval_max_new_tokens is not None else {}
    return ops | {"base_model": section("base_model", {"model": args.base}),
                  "qlora_adapter": section("qlora_adapter", training),
                  "adapter_evaluation": section("adapter_evaluation", evaluation)}


def _checked_model_ops(args: argparse.Namespace, resources: dict) -> dict:
    """The model stage's op config (``_model_stage_ops``), checked before any work as its steps would check it
    minutes later: Dagster's own config check (unknown keys, wrong types), then each config class (NaN, inf) and
    domain spec (ranges). Any problem is one ``ValueError`` line naming the key."""
    import difflib
    import re

    import dagster as dg
    import pydantic

    from finpipe.definitions import in_groups
    from finpipe.defs.evaluation import EvaluationConfig
    from finpipe.defs.models import AdapterTrainingConfig, BaseModelConfig, ScratchGPTConfig
    from finpipe.evaluation.evaluate import EvalSpec
    from finpipe.models.scratch import ScratchGPTSpec
    from finpipe.training.spec import AdapterSpec

    ops = _model_stage_ops(args)
    where = f"{args.config} with the command-line options" if args.config else "from the command-line options"
    classes = {"base_model": (BaseModelConfig, None), "qlora_adapter": (AdapterTrainingConfig, AdapterSpec),
               "adapter_evaluation": (EvaluationConfig, EvalSpec), "scratch_gpt": (ScratchGPTConfig, ScratchGPTSpec)}

    def said(message: str) -> str:  # Dagster's messages spell out the whole schema: the key and the value suffice
        if found := re.match(r'Received unexpected config entry "([^"]+)" at path root:([\w:]+)', message):
            key, path = found.groups()
            op = path.split(":")[1] if path.count(":") >= 1 else ""
            known = list(classes[op][0].model_fields) if op in classes else []
            if path.count(":") == 1 and key in known:  # ops: {qlora_adapter: {max_minutes: 3}}
                return f"unknown key {key!r} in ops.{op}: settings go under ops.{op}.config"
            close = difflib.get_close_matches(key, known if path.endswith(":config") else list(classes), n=1)
            return f"unknown key {key!r} in {path.replace(':', '.')}" + (f" (did you mean {close[0]!r}?)" if close else "")
        if found := re.match(r'Invalid scalar at path root:([\w:]+)\. Value "([^"]*)" .* expected type "(\w+)"', message):
            path, value, kind = found.groups()
            return f"{path.replace(':', '.')}: {value!r} is not {kind.lower()}"
        return message.split(". Expected")[0]

    job = dg.Definitions(assets=in_groups("models", "evaluation", "scratch"),
                         resources=resources).resolve_implicit_global_asset_job_def()
    try:
        dg.validate_run_config(job, {"ops": ops})
    except dg.DagsterInvalidConfigError as exc:
        raise ValueError(f"invalid run config ({where}): " + "; ".join(said(e.message) for e in exc.errors)) from None
    for op, section in ops.items():
        config_class, spec_class = classes[op]
        try:
            config = config_class(**((section or {}).get("config") or {}))
            if op == "qlora_adapter" and config.warm_start not in ("none", "champion"):
                raise ValueError(f"warm_start must be 'none' or 'champion', got {config.warm_start!r}")
            if spec_class is not None:
                spec_class(**config.model_dump(include={f.name for f in dataclasses.fields(spec_class)}))
        except pydantic.ValidationError as exc:
            problems = [f"ops.{op}.config.{'.'.join(map(str, e['loc']))}: {e['msg'].lower()}, got {e['input']!r}"
                        for e in exc.errors()]
            raise ValueError(f"invalid run config ({where}): " + "; ".join(problems)) from None
        except ValueError as exc:
            raise ValueError(f"invalid run config ({where}): ops.{op}.config: {exc}") from None
    return ops


def _print_model_stage(models) -> str:
    """What the model stage made: the adapter, its strict scores against the base, the promotion; returns the
    report's path."""
    adapter = {k: v.value for k, v in models.asset_materializations_for_node("qlora_adapter")[0].metadata.items()}
    print(f"adapter: {adapter['path']}")
    print(f"  trained as {adapter['trained_as']}, {adapter['device']} {adapter['precision']}: loss on its "
          f"{adapter.get('val_loss_samples', 'few')} validation samples {adapter['initial_val_loss']} -> "
          f"{adapter['best_val_loss']} (the evaluation's validation loss is on more) in {adapter['steps']} steps "
          f"({adapter['train_tokens']:,} tokens, {adapter['wall_time_s']} s, {adapter['tokens_per_s']} tokens/s, "
          f"stopped by {adapter['stopped_by']}), peak {adapter['peak_memory_mb']} MB")
    meta = lambda node: {k: v.value for k, v in models.asset_materializations_for_node(node)[0].metadata.items()}  # noqa: E731
    evaluation, promotion, report = meta("adapter_evaluation"), meta("champion_adapter"), meta("evaluation_report")
    shown = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"evaluation (golden set, strict): number correctness {shown(evaluation['base_number_correctness'])} -> "
          f"{shown(evaluation['adapter_number_correctness'])}, label correctness "
          f"{shown(evaluation['base_label_correctness'])} -> {shown(evaluation['adapter_label_correctness'])}, exact "
          f"match {shown(evaluation['base_exact_match'])} -> {shown(evaluation['adapter_exact_match'])}, format validity "
          f"{shown(evaluation['base_format_validity'])} -> {shown(evaluation['adapter_format_validity'])} (base -> "
          f"adapter); forgetting probe {shown(evaluation['base_forgetting_probe'])} -> "
          f"{shown(evaluation['adapter_forgetting_probe'])}")
    print(("promotion: promoted " if promotion["promoted"] else "promotion: kept the champion, ")
          + f"{promotion['challenger'] if promotion['promoted'] else promotion['champion'] or 'none'} ({promotion['reason']})")
    _print_tracking(adapter, evaluation, report, promotion)
    return report["html"]


def _print_tracking(*steps: dict) -> None:
    """The adapter's MLflow run and how to see it, and what was not logged (nothing when tracking is off)."""
    from finpipe.tracking import is_server, ui_command

    training = steps[0]
    if "mlflow_tracking_uri" not in training:
        return
    uri = training["mlflow_tracking_uri"]
    if training.get("mlflow_run_id"):
        version = f", model version {training['mlflow_model_version']}" if training.get("mlflow_model_version") else ""
        print(f"mlflow: run {training['mlflow_run_id']}{version} in {uri}: {training['mlflow_run']}"
              + ("" if is_server(uri) else f" (after `{ui_command(uri, paths.lake_dir())}`)"))
    missing = [item for step in steps for item in (step.get("mlflow_missing") or [])]
    if missing:
        print(f"mlflow: not logged: {', '.join(dict.fromkeys(missing))}", file=sys.stderr)


def _config_ops(path: str | None) -> dict:
    """The ``ops`` section of a run-config YAML (the format the UI's Launchpad takes), validated by name."""
    if not path:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise FileNotFoundError(f"cannot read the run config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"the run config {path} is not valid YAML: {exc}") from None
    if isinstance(data, dict) and set(data) - {"ops"}:  # `opps:` (or `resources:`) would be silently ignored
        raise ValueError(f"the run config {path} may hold only `ops:`; unknown key "
                         f"{', '.join(map(repr, sorted(map(str, set(data) - {'ops'}))))}")
    ops = data.get("ops", {}) if isinstance(data, dict) else None
    known = {"base_model", "qlora_adapter", "adapter_evaluation", "scratch_gpt"}
    if not isinstance(ops, dict) or set(ops) - known:
        raise ValueError(f"the run config {path} must hold `ops:` for {', '.join(sorted(known))}; got "
                         f"{', '.join(sorted(set(ops or {}) - known)) or type(ops).__name__}")
    return ops


def _is_interrupt_event(event) -> bool:
    from dagster._core.events import RunFailureReason
    from dagster._core.execution.plan.objects import ErrorSource

    data = event.event_specific_data
    return bool((event.is_step_failure and getattr(data, "error_source", None) == ErrorSource.INTERRUPT)
                or (event.is_run_failure
                    and getattr(data, "failure_reason", None) == RunFailureReason.UNEXPECTED_TERMINATION))


def _interrupted(result) -> bool:
    """Dagster turns Ctrl-C inside a step into a failed step (``raise_on_error=False`` returns it as a result): was
    this run's failure an interruption?"""
    return any(_is_interrupt_event(event) for event in result.all_events)


#: errors that explain themselves (a ``dg.Failure`` raised by a step, finpipe's lake errors): their exit codes, as
#: ``main`` gives them outside Dagster; a ``dg.Failure`` carries its cause's class in its metadata ``error``
_EXPLAINED_ERRORS = {"CorruptLakeError": EXIT_LAKE_CORRUPT, "LakeLockedError": EXIT_LAKE_LOCKED,
                     "PermissionError": EXIT_BAD_INPUT, "FileNotFoundError": EXIT_BAD_INPUT,
                     "IsADirectoryError": EXIT_BAD_INPUT, "NotADirectoryError": EXIT_BAD_INPUT}


def _explained_failure(event) -> tuple[int, str] | None:
    """(exit code, the one line) for a step or run that failed with an error that explains itself; None for any
    other failure (a bug: its stack trace stays on the console)."""
    if not (event.is_step_failure or event.is_run_failure):
        return None
    data = event.event_specific_data
    error = getattr(data, "error", None)
    while error is not None:
        line = error.message.strip().splitlines()[0] if error.message.strip() else error.cls_name
        named, _, said = line.partition(": ")  # "finpipe.market.lake.LakeLockedError: lake ... is locked ..."
        line = said if said and named.rsplit(".", 1)[-1] == error.cls_name else line
        if error.cls_name == "Failure":
            failure = getattr(data, "user_failure_data", None)
            cause = failure.metadata.get("error") if failure else None
            cause = getattr(cause, "value", cause)
            return _EXPLAINED_ERRORS.get(str(cause), EXIT_BAD_INPUT), (failure.description if failure else line)
        if error.cls_name in _EXPLAINED_ERRORS:
            return _EXPLAINED_ERRORS[error.cls_name], line
        error = error.cause or error.context
    return None


class _WithoutInterruptStacks(logging.Filter):
    """Drops the console records of a Ctrl-C (Dagster logs the interrupted step and run as failures, each with a
    stack trace) and of failures that explain themselves; ``main`` and ``_report`` say them in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        event = (getattr(record, "dagster_meta", None) or {}).get("dagster_event")
        return event is None or not (_is_interrupt_event(event) or _explained_failure(event))


class _ConsoleLogger(logging.Logger):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.addFilter(_WithoutInterruptStacks())


@contextlib.contextmanager
def _quiet_interrupts():
    """Dagster builds its console logger from ``logging.getLoggerClass()`` for each run: while a finpipe command
    runs, that class carries the filter above."""
    before = logging.getLoggerClass()
    logging.setLoggerClass(_ConsoleLogger)
    try:
        yield
    finally:
        logging.setLoggerClass(before)


def _report(result, what: str) -> int:
    """0 when the run succeeded and its blocking checks passed; else the exit code, said in one line."""
    import dagster as dg

    if not result.success and _interrupted(result):
        raise KeyboardInterrupt  # main() ends it with one line and EXIT_INTERRUPTED
    explained = next(filter(None, (_explained_failure(e) for e in result.all_events if e.is_step_failure)), None)
    if not result.success and explained:
        print(f"error: {explained[1]}", file=sys.stderr)
        return explained[0]
    evaluations = [c for c in result.get_asset_check_evaluations() if not c.passed]
    failed_checks = [c.check_name for c in evaluations if c.severity != dg.AssetCheckSeverity.WARN]
    warnings = [c.check_name for c in evaluations if c.severity == dg.AssetCheckSeverity.WARN]
    if warnings:
        print(f"finpipe: {what}: warnings from checks: {', '.join(warnings)}", file=sys.stderr)
    if failed_checks:
        print(f"finpipe: {what}: checks failed: {', '.join(failed_checks)}", file=sys.stderr)
    if not result.success:
        print(f"finpipe: the {what} run failed; see the log above (or `finpipe ui`, Runs tab).", file=sys.stderr)
    return 0 if result.success and not failed_checks else 1


def _partition_keys(start: dt.date, end: dt.date) -> tuple[str, str]:
    """First and last weekday partition keys inside [start, end]."""
    while start.weekday() >= 5:
        start += dt.timedelta(days=1)
    while end.weekday() >= 5:
        end -= dt.timedelta(days=1)
    if end < start:
        raise SystemExit(f"error: no weekday between {start} and {end}")
    return start.isoformat(), end.isoformat()


def _weekdays(first: dt.date, last: dt.date) -> int:
    """Weekday partitions from ``first`` to ``last``, both included."""
    days = (last - first).days + 1
    weeks, rest = divmod(days, 7)
    return weeks * 5 + sum((first + dt.timedelta(days=i)).weekday() < 5 for i in range(rest))


def _snapshot_after_run() -> None:
    """Keep a copy of the lake after a successful run (the newest few): a damaged lake loses at most one run."""
    from finpipe.market.lake import LakeLockedError
    from finpipe.market.snapshots import snapshot

    try:
        taken = snapshot(paths.lake_db_path())
    except LakeLockedError:
        print("finpipe: the lake is held by another process: no snapshot this time", file=sys.stderr)
        return
    if taken:
        print(f"lake snapshot: {taken}")


def cmd_ui(args: argparse.Namespace) -> int:
    """Start the Dagster UI (``dg dev`` on the project; ``dagster dev -w workspace.yaml`` where dg is missing) on
    127.0.0.1 with finpipe's persistent instance; with ``--mlflow``, MLflow's UI on the tracked runs instead."""
    args.port = args.port if args.port is not None else (MLFLOW_UI_PORT if getattr(args, "mlflow", False) else 3000)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if getattr(args, "mlflow", False):
        return _mlflow_ui(args)
    _prepare_dagster_home()
    bin_dir = Path(sys.executable).parent  # the venv's own tools: `.venv/bin/finpipe ui` needs no activated venv
    dg_cli, dagster_cli = bin_dir / "dg", bin_dir / "dagster"
    if dg_cli.exists():
        argv = [str(dg_cli), "dev", "--host", args.host, "--port", str(args.port)]
    elif dagster_cli.exists():
        argv = [str(dagster_cli), "dev", "-w", str(paths.REPO_ROOT / "workspace.yaml"), "-h", args.host,
                "-p", str(args.port)]
    else:
        raise FileNotFoundError(f"neither dg nor dagster is installed next to {sys.executable}: run scripts/setup.sh")
    os.chdir(paths.REPO_ROOT)
    os.execv(argv[0], argv)
    return 0  # not reached


MLFLOW_UI_PORT = 5000


def _mlflow_ui(args: argparse.Namespace) -> int:
    """``mlflow ui`` on the lake's store (runs in its SQLite database, artifacts in its folder); a tracking server
    shows its runs itself."""
    import importlib.util

    from finpipe.tracking import TrackingSpec, artifact_root, is_server, shown_uri, tracking_uri

    uri = tracking_uri(TrackingSpec.from_env(), paths.lake_dir())
    if is_server(uri):
        print(f"the runs are on the tracking server {shown_uri(uri)}: open it in a browser")
        return 0
    found = importlib.util.find_spec("mlflow")
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    if found is None or not mlflow_cli.exists():
        raise FileNotFoundError("mlflow is not installed: pip install -e '.[mlflow]' (docs/tracking.md)")
    pages = Path(found.origin).parent / "server" / "js" / "build" / "index.html"
    if not pages.exists():  # mlflow-skinny, the [mlflow] extra: the server and its API, not the built web pages
        print("finpipe: MLflow's web pages are not installed (the [mlflow] extra has mlflow-skinny): the API answers, "
              "the pages need the full package, `pip install mlflow` (docs/tracking.md)", file=sys.stderr)
    argv = [str(mlflow_cli), "ui", "--backend-store-uri", uri, "--artifacts-destination",
            str(artifact_root(paths.lake_dir())), "--host", args.host, "--port", str(args.port), "--workers", "1"]
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # MLflow's job runner: not used by finpipe
    print(f"finpipe: MLflow's UI on {shown_uri(uri)} at http://{args.host}:{args.port}", file=sys.stderr)
    os.execv(argv[0], argv)
    return 0  # not reached


def cmd_study(args: argparse.Namespace) -> int:
    """Both studies on the current lake: one run per PEFT method partition, the comparison, the compression."""
    _prepare_dagster_home()
    import dagster as dg

    from finpipe.defs.resources import build_resources
    from finpipe.defs.studies import compression_study, peft_comparison, peft_method_run
    from finpipe.studies.peft_study import STUDY_METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(STUDY_METHODS)
    unknown = sorted(set(methods) - set(STUDY_METHODS))
    if unknown:
        raise ValueError(f"unknown PEFT methods {unknown}; the study covers {', '.join(STUDY_METHODS)}")
    resources, instance = build_resources(), dg.DagsterInstance.get()
    run_config = {"loggers": {"console": {"config": {"log_level": args.log_level}}}}
    _quiet_progress_bars(False)
    peft_ops = {"ops": {"peft_method_run": {"config": {"max_steps": args.max_steps} if args.max_steps else {}}}}
    reports = []
    if not args.skip_peft:
        for i, method in enumerate(methods, 1):
            print(f"finpipe: [peft {i}/{len(methods)}] {method}")
            done = dg.materialize([peft_method_run], partition_key=method, resources=resources, instance=instance,
                                  raise_on_error=False, run_config=run_config | peft_ops)
            if code := _report(done, f"{method} study"):
                return code
        done = dg.materialize([peft_comparison], resources=resources, instance=instance, raise_on_error=False,
                              run_config=run_config)
        if code := _report(done, "PEFT comparison"):
            return code
        reports.append(done.asset_materializations_for_node("peft_comparison")[0].metadata["html"].value)
    if not args.skip_compression:
        print("finpipe: [compression] the champion: PTQ variants and successive layer dropping")
        compression = {"ks": [int(k) for k in args.drop.split(",")]} | (
            {"heal_steps": args.heal_steps} if args.heal_steps is not None else {})
        ops = {"ops": {"compression_study": {"config": compression}}}
        done = dg.materialize([compression_study], resources=resources, instance=instance, raise_on_error=False,
                              run_config=run_config | ops)
        if code := _report(done, "compression study"):
            return code
        reports.append(done.asset_materializations_for_node("compression_study")[0].metadata["html"].value)
    for path in reports:
        print(f"report: {path}")
    return 0
