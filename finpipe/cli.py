"""The ``finpipe`` command line.

Heavy imports (Dagster, ML libraries) happen inside the commands, so ``finpipe --help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import logging
import math
import os
import sys
from pathlib import Path

from finpipe import paths

# thirteen years of sessions: calm and stressed markets (2000-02, 2008), so every label value of the rules is taught
DEFAULT_HISTORY_DAYS = 13 * 365 + 3
#: exit codes: 1 a run failed (its log says why), 2 bad input or configuration, 3 the lake is held by another
#: process, 4 the lake file is unreadable, 5 the address `finpipe serve` would listen on is in use, 130 interrupted
EXIT_UNEXPECTED, EXIT_BAD_INPUT, EXIT_LAKE_LOCKED, EXIT_LAKE_CORRUPT, EXIT_INTERRUPTED = 1, 2, 3, 4, 130
EXIT_ADDRESS_IN_USE = 5


def _prepare_dagster_home() -> Path:
    """A persistent Dagster instance under the lake, so `finpipe run` history shows in `finpipe ui`."""
    home = paths.dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
    _event_log_without_fsync()
    return home


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

    import dagster as dg

    from finpipe.definitions import in_groups
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
    run_config = {"loggers": {"console": {"config": {"log_level": args.log_level}}}}

    # Run 1: the partitioned prices, the whole range in one run. Run 2: everything derived from them.
    # Run 3: base model, adapter, evaluation, report and promotion.
    print(f"finpipe: [1/3] ingesting {market.universe} from {source.name}, {first_key} .. {last_key}")
    ingest = dg.materialize(
        in_groups("market_data"), resources=resources, instance=instance, raise_on_error=False,
        tags={PARTITION_RANGE_START_TAG: first_key, PARTITION_RANGE_END_TAG: last_key}, run_config=run_config,
    )
    if code := _report(ingest, "ingestion"):
        return code
    lake = resources["lake"]
    print(lake.prices_lake().query(
        "SELECT ticker, count(*) AS rows, min(date) AS first, max(date) AS last, any_value(source) AS source "
        "FROM prices GROUP BY ticker ORDER BY ticker"
    ))
    print(f"lake: {lake.db_path}")
    if args.only_lake:
        _snapshot_after_run()
        return 0

    print("finpipe: [2/3] statistics, instruction samples (quality gates), train/validation split")
    derived = dg.materialize(in_groups("statistics", "datasets"), resources=resources, instance=instance,
                             raise_on_error=False, run_config=run_config)
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
        if code := _report(dg.materialize(in_groups("scratch"), resources=resources, instance=instance,
                                          raise_on_error=False, run_config=run_config | scratch_ops), "scratch GPT"):
            return code
    training = ops["qlora_adapter"]["config"]
    budget = [f"{training['max_minutes']} min" if "max_minutes" in training else None,
              f"{training['max_steps']} steps" if training.get("max_steps") else None]
    print(f"finpipe: [3/3] base model ({args.base}), adapter ({training.get('quantization', 'auto')}; budget "
          f"{' / '.join(b for b in budget if b) or 'the default'}), evaluation, report, promotion")
    models = dg.materialize(in_groups("models", "evaluation"), resources=resources, instance=instance,
                            raise_on_error=False,
                            run_config=run_config | {"ops": ops})
    if code := _report(models, "model"):
        return code
    report = _print_model_stage(models)
    _snapshot_after_run()
    print(f"report: {report}")  # the last line: the one a user opens
    return 0


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
    print(f"  trained as {adapter['trained_as']}, {adapter['device']} {adapter['precision']}: validation loss "
          f"{adapter['initial_val_loss']} -> {adapter['best_val_loss']} in {adapter['steps']} steps "
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
    return report["html"]


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


def cmd_ui(args: argparse.Namespace) -> int:
    """Start the Dagster UI (``dg dev`` on the project; ``dagster dev -w workspace.yaml`` where dg is missing) on
    127.0.0.1 with finpipe's persistent instance."""
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
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


def cmd_sql(args: argparse.Namespace) -> int:
    """Run a read-only SQL query against the lake."""
    import polars as pl

    from finpipe.market.lake import PriceLake

    if not args.query.strip():
        raise ValueError("the query is empty: e.g. finpipe sql \"select * from prices limit 5\"")
    if not (math.isfinite(args.lock_timeout) and args.lock_timeout >= 0):  # a NaN deadline never comes: it hung
        raise ValueError(f"--lock-timeout must be a finite number of seconds >= 0, got {args.lock_timeout}")
    import duckdb

    db = paths.lake_db_path()
    if not db.exists():
        raise FileNotFoundError(f"no lake at {db}: run `finpipe run` first")
    try:
        frame = PriceLake(db, lock_timeout_s=args.lock_timeout).query_untrusted(args.query)
    except duckdb.PermissionException as exc:
        raise ValueError(f"refused: finpipe sql is read-only (no file access, no ATTACH, no extensions): "
                         f"{str(exc).splitlines()[0]}") from None
    except duckdb.Error as exc:  # any other failure of the query itself (parse, catalog, overflow, type, ...)
        raise ValueError(f"the query failed: {str(exc).splitlines()[0]}") from None
    with pl.Config(tbl_rows=args.limit, tbl_cols=-1, tbl_width_chars=200):
        print(frame)
    return 0


# --------------------------------------------------------------------------- inference: ask, chat, demo, export, runs

#: model_runs column -> its header in `finpipe runs` (short, so a run fits on one terminal line)
RUNS_COLUMNS = {"run_id": "run_id", "created_at": "created", "status": "status", "base_model": "base",
                "quantization": "quant", "train_last": "train_last", "val_cutoff": "val_cutoff",
                "val_loss": "val_loss", "golden_number_correctness": "numbers", "golden_label_correctness": "labels",
                "golden_exact_match": "exact", "forgetting_probe": "probe", "train_tokens": "tokens",
                "reason": "reason"}


def _sampling(args: argparse.Namespace):
    """Validated before anything is loaded, so a bad value costs nothing but a one-line error."""
    from finpipe.evaluation.generation import Sampling

    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty)


def _resolve_model(which: str) -> tuple[str, Path, Path | None]:
    """(label, base folder, adapter folder or None) for ``--adapter``.

    With an adapter, the base is the one it was trained on (recorded in its pointer), not today's base.
    """
    from finpipe.models import registry

    lake_dir = paths.lake_dir()
    pointer = registry.base_pointer(lake_dir)
    # "none" and an adapter folder take the base from its pointer: say what to run when it is missing
    if which not in ("champion", "latest") and not pointer.exists() and (
            which == "none" or (Path(which).expanduser() / "adapter_config.json").exists()):
        raise FileNotFoundError(f"no base model yet ({pointer} is missing): run `finpipe run` first")
    payload = registry.resolve_adapter(lake_dir, which)
    if payload is None:
        base = registry.read_pointer(pointer, required=registry.BASE_POINTER_FIELDS)
        label, base_dir, adapter_dir = f"base {base['name']}", Path(base["path"]), None
    else:
        base = payload["base"]
        label = f"{which if which in ('champion', 'latest') else 'adapter'} {payload['run_id']}"
        base_dir, adapter_dir = Path(base["path"]), Path(payload["path"])
        if not adapter_dir.is_dir():
            raise FileNotFoundError(f"adapter folder {adapter_dir} (run {payload['run_id']}) no longer exists")
    if not base_dir.is_dir():
        raise FileNotFoundError(f"base model folder {base_dir} ({base['name']}) no longer exists: run `finpipe run`")
    return label, base_dir, adapter_dir


def _facts():
    from finpipe.inference.context import LakeFacts
    from finpipe.market.lake import PriceLake

    return LakeFacts(PriceLake(paths.lake_db_path()))


def _quiet_transformers() -> None:
    """No weight-loading progress bars or library deprecation warnings between a question and its answer."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.|peft\.")


def _answer_spec(args: argparse.Namespace):
    """The ``--decode-weights`` and ``--on-unverified`` choices, validated before anything is loaded."""
    from finpipe.inference.answering import AnswerSpec
    from finpipe.settings import chosen

    return AnswerSpec(**chosen(args, AnswerSpec))


def _load(choice: tuple[str, Path, Path | None], merge: bool = True, decode=None):
    """(label, model, tokenizer) for a ``_resolve_model`` choice; the adapter merged unless the caller needs
    to switch it off (the demo compares with the base); ``decode``: a ``DecodeSpec`` (int8 decode steps)."""
    from finpipe.evaluation.generation import load_chat_model
    from finpipe.models.int8_decode import uses_int8_decode

    _quiet_transformers()
    label, base_dir, adapter_dir = choice
    if adapter_dir is not None and merge:  # merged once, then loaded as a plain model: no peft, no merge per answer
        from finpipe.models import merged
        from finpipe.runtime import accelerator, inference_dtype

        dtype = str(inference_dtype(accelerator())).removeprefix("torch.")
        folder = merged.cached(paths.lake_dir(), adapter_dir.name, base_dir, adapter_dir, dtype) or merged.build(
            paths.lake_dir(), adapter_dir.name, base_dir, adapter_dir, dtype,
            log=lambda line: print(f"finpipe: {line}", file=sys.stderr))
        print(f"finpipe: loading {label} (merged: {folder})", file=sys.stderr)
        model, tokenizer = load_chat_model(folder, None, decode=decode)
    else:
        print(f"finpipe: loading {label} ({base_dir}{' + ' + str(adapter_dir) if adapter_dir else ''})",
              file=sys.stderr)
        model, tokenizer = load_chat_model(base_dir, adapter_dir, merge=merge, decode=decode)
    weights = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"finpipe: {weights} weights" + (", int8 decode steps" if uses_int8_decode(model) else ""), file=sys.stderr)
    return label, model, tokenizer


def _in_context(prepared, tokenizer, model, sampling) -> int:
    """The prompt's token count, after checking that it and the answer fit the model's context."""
    prompt_tokens = len(tokenizer.apply_chat_template(prepared.messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"])
    context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    if prompt_tokens + sampling.max_new_tokens > context:
        raise ValueError(f"the question is too long: {prompt_tokens} prompt tokens + {sampling.max_new_tokens} "
                         f"answer tokens exceed the model's context of {context}")
    return prompt_tokens


def _answer(prepared, model, tokenizer, sampling, label: str, show_prompt: bool, spec) -> bool:
    """Generate and verify through the answering path (``finpipe.inference.answering``), print: the answer on
    stdout (pipeable); notes, and the verdict with the data's date and the speed in one line, on stderr. A refused
    question prints its refusal on stderr without calling the model; returns False then."""
    from finpipe.evaluation.generation import generate
    from finpipe.inference.answering import answer

    if prepared.refusal is not None:
        print(f"finpipe: {prepared.refusal}", file=sys.stderr)
        return False
    for note in prepared.grounding.notes:
        print(f"finpipe: {note}", file=sys.stderr)
    _in_context(prepared, tokenizer, model, sampling)
    if show_prompt:
        print("--- prompt ---")
        print(tokenizer.apply_chat_template(prepared.messages, add_generation_prompt=True, tokenize=False), end="")
        print("\n--- answer ---")
    result = answer(prepared, lambda messages, s: generate(model, tokenizer, messages, s), sampling,
                    spec.on_unverified)
    print(result.text)
    out = result.generated
    tries = f", {result.attempts} attempts" if result.attempts > 1 else ""
    print(f"finpipe: {result.status_line()} [{label}: {out.new_tokens} tokens in {out.seconds:.1f} s, "
          f"{out.tokens_per_s:.1f} tokens/s{tries}]", file=sys.stderr)
    return True


def _running_server(args: argparse.Namespace, spec) -> str | None:
    """The URL of a `finpipe serve` that answers exactly as this `ask` would: same lake, same champion, same
    policy (its /health says so), or None. Standard library only: nothing heavy is imported to find out."""
    import json
    import urllib.request

    if args.server == "off" or args.adapter != "champion" or args.show_prompt or args.repetition_penalty != 1.0 \
            or args.allow_ungrounded:
        return None
    url = "http://127.0.0.1:8000" if args.server == "auto" else args.server.rstrip("/")
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=0.5) as reply:
            health = json.loads(reply.read())
        from finpipe.models import registry

        champion = registry.read_pointer(registry.champion_pointer(paths.lake_dir()))["run_id"]
    except (OSError, ValueError, KeyError):
        return None
    same = (health.get("status") == "ok" and health.get("lake") == str(paths.lake_dir().resolve())
            and health.get("champion") == champion and health.get("on_unverified") == spec.on_unverified)
    return url if same else None


def _ask_server(url: str, question: str, sampling) -> int:
    """Send the question to a running server; print as an in-process answer prints."""
    import json
    import time
    import urllib.error
    import urllib.request

    body = {"model": "champion", "messages": [{"role": "user", "content": question}],
            "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            answer = json.loads(reply.read())
    except urllib.error.HTTPError as exc:  # the server's own one-line error (a refusal is a 200)
        raise ValueError(json.loads(exc.read()).get("error", {}).get("message", str(exc))) from None
    finpipe, text = answer.get("finpipe", {}), answer["choices"][0]["message"]["content"]
    if finpipe.get("verdict") == "refused":
        raise ValueError(text)
    print(text)
    print(f"finpipe: {finpipe.get('status_line', finpipe.get('verdict'))} [answered by the server at {url}: "
          f"{answer['usage']['completion_tokens']} tokens in {time.perf_counter() - started:.1f} s]", file=sys.stderr)
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    """Answer one question, grounded in the lake's latest facts for the tickers it names, and verified."""
    from finpipe.inference.answering import prepare

    sampling, spec = _sampling(args), _answer_spec(args)
    if url := _running_server(args, spec):  # a server already holds the model: no load at all
        return _ask_server(url, args.question, sampling)
    choice = _resolve_model(args.adapter)  # cheap checks first: pointers, lake, then the model
    facts = _facts()
    facts.tickers()
    prepared = prepare(args.question, facts, args.allow_ungrounded)  # refused before the model loads
    if prepared.refusal is not None:
        raise ValueError(prepared.refusal)
    label, model, tokenizer = _load(choice, decode=spec)
    _answer(prepared, model, tokenizer, sampling, label, args.show_prompt, spec)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Answer questions read line by line from stdin until EOF, `exit` or `quit` (model loaded once)."""
    from finpipe.inference.answering import prepare

    sampling, spec = _sampling(args), _answer_spec(args)
    choice = _resolve_model(args.adapter)
    facts = _facts()
    known = facts.tickers()
    label, model, tokenizer = _load(choice, decode=spec)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"finpipe chat with {label}; tickers: {', '.join(known)}. `exit` or Ctrl-D ends.")
    try:
        while True:
            if interactive:
                try:
                    line = input("you> ")
                except EOFError:
                    print()
                    break
            else:
                line = sys.stdin.readline()
                if not line:
                    break
            question = line.strip()
            if question.lower() in ("exit", "quit"):
                break
            if not question:
                continue
            try:
                _answer(prepare(question, facts, args.allow_ungrounded), model, tokenizer, sampling, label,
                        args.show_prompt, spec)
            except ValueError as exc:  # one bad question does not end the chat
                print(f"finpipe: {exc}", file=sys.stderr)
    except KeyboardInterrupt:  # Ctrl-C ends the chat, not with a traceback
        print()
    return 0


def _columns(left: str, right: str, width: int) -> str:
    """Two texts side by side, each wrapped to half of ``width``."""
    import itertools
    import textwrap

    col = max(20, (width - 3) // 2)
    a, b = (textwrap.wrap(text, col) or [""] for text in (left, right))
    return "\n".join(f"{x:<{col}} | {y}" for x, y in itertools.zip_longest(a, b, fillvalue=""))


def cmd_demo(args: argparse.Namespace) -> int:
    """Preset questions, one per family: the base model's answer next to the adapter's, with the facts."""
    import shutil

    from finpipe.evaluation.generation import generate
    from finpipe.inference.answering import answer, prepare
    from finpipe.inference.context import demo_questions

    if args.adapter == "none":
        raise ValueError("demo compares the base model with an adapter: --adapter none leaves nothing to compare")
    sampling = _sampling(args)
    choice = _resolve_model(args.adapter)
    facts = _facts()
    questions = demo_questions(facts.tickers())
    label, model, tokenizer = _load(choice, merge=False)  # disable_adapter() gives the base model
    width = min(shutil.get_terminal_size((120, 24)).columns, 160)

    def with_base(messages, s):
        with model.disable_adapter():  # the same weights without the adapter: the base model
            return generate(model, tokenizer, messages, s)

    for i, (family, question) in enumerate(questions, 1):
        prepared = prepare(question, facts)
        tuned = answer(prepared, lambda messages, s: generate(model, tokenizer, messages, s), sampling)
        base = answer(prepared, with_base, sampling)
        grounding = prepared.grounding
        print("=" * width)
        print(f"[{i}/{len(questions)}] {family}: {', '.join(grounding.tickers)} as of {grounding.as_of}")
        print(f"Q: {question}")
        print(f"reference: {grounding.reference or '(no reference)'}")
        print("-" * width)
        print(_columns("base model", label, width))
        print(_columns(base.text or "(empty)", tuned.text or "(empty)", width))
        print(_columns(f"[{base.status_line()}]", f"[{tuned.status_line()}]", width))
    print("reference = the rule-based answer from the lake's facts (what the training samples teach)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Merge the adapter into its base: a plain Hugging Face folder (--merged) or GGUF files for llama.cpp and
    Ollama with a Modelfile, a model card and a parity check (--gguf)."""
    if args.adapter == "none":
        raise ValueError("export merges an adapter: --adapter none has nothing to merge")
    if bool(args.merged) == bool(args.gguf):
        raise ValueError("choose one: --merged DIR (a Hugging Face folder) or --gguf DIR (GGUF + Modelfile)")
    if args.parity_samples < 0:
        raise ValueError(f"--parity-samples must be >= 0 (0 = every golden question), got {args.parity_samples}")
    label, base_dir, adapter_dir = _resolve_model(args.adapter)
    from finpipe.inference.export import check_target

    # an unwritable folder, or one holding more than a previous export, is refused before minutes of merging
    check_target(Path(args.merged or args.gguf), args.force, [base_dir, adapter_dir])
    _quiet_transformers()
    if args.merged:
        from finpipe.inference.export import export_merged

        print(f"finpipe: merging {label} into {base_dir}", file=sys.stderr)
        report = export_merged(base_dir, adapter_dir, Path(args.merged), force=args.force,
                               provenance={"adapter_label": label})
        print(f"exported: {report.path} ({report.parameters:,} parameters, {report.dtype}, "
              f"{report.size_bytes / 1e6:.1f} MB)")
        print(f"load with: AutoModelForCausalLM.from_pretrained({str(report.path)!r})")
        return 0

    import shlex
    import time

    from finpipe.inference.export import export_gguf
    from finpipe.inference.lineage import adapter_lineage
    from finpipe.instructions.samples import read_jsonl
    from finpipe.models import registry

    lake_dir = paths.lake_dir()
    outtypes = tuple(t.strip() for t in args.gguf_types.split(",") if t.strip())
    payload = registry.resolve_adapter(lake_dir, args.adapter)
    golden_file = paths.DatasetFiles.of(lake_dir).golden
    golden = read_jsonl(golden_file)[: args.parity_samples or None] if golden_file.exists() else []
    if not golden:
        print(f"finpipe: no golden set at {golden_file}: the parity check is skipped", file=sys.stderr)
    name = f"finpipe-{payload['run_id']}"
    print(f"finpipe: exporting {label} as GGUF ({', '.join(outtypes)}) into {args.gguf}", file=sys.stderr)
    started = time.perf_counter()
    result = export_gguf(base_dir, adapter_dir, Path(args.gguf), name, outtypes, golden,
                         adapter_lineage(lake_dir, payload), force=args.force,
                         log=lambda line: print(f"finpipe: {line}", file=sys.stderr))
    for f in result.files:
        print(f"gguf: {f.path} ({f.outtype}, {f.size_bytes / 2**20:.1f} MiB)")
    print(f"modelfile: {result.folder / 'Modelfile'}\nmodel card: {result.folder / 'README.md'}")
    for p in result.parity:
        print(f"parity: {p.file} ({p.reader}): {p.identical}/{p.answers} answers identical to the merged model at its "
              "precision, "
              f"number correctness {p.number_correctness} vs {p.reference_number_correctness}, label correctness "
              f"{p.label_correctness} vs {p.reference_label_correctness} -> "
              f"{'pass' if p.passed else 'FAIL'} ({p.rule})")
    print(f"export took {time.perf_counter() - started:.0f} s ({', '.join(f'{k} {v} s' for k, v in result.seconds.items())})")
    print(f"run with: cd {shlex.quote(str(result.folder))} && ollama create finpipe -f Modelfile && ollama run finpipe")
    return 0 if result.passed else 1


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the champion (and the base, and every kept adapter) over an OpenAI-compatible HTTP API."""
    from finpipe.serving.app import AddressInUseError, ServeSpec, serve
    from finpipe.settings import chosen

    spec = ServeSpec(**chosen(args, ServeSpec))  # validated before anything loads
    lake_dir = paths.lake_dir()
    if not (lake_dir / paths.LAKE_DB_NAME).exists():
        raise FileNotFoundError(f"no lake at {lake_dir}: run `finpipe run` first")
    _quiet_transformers()
    try:
        serve(lake_dir, spec, log=lambda line: print(f"finpipe serve: {line}", file=sys.stderr, flush=True))
    except AddressInUseError as exc:  # its own code: 3 means a locked lake
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ADDRESS_IN_USE
    return 0


def cmd_lake(args: argparse.Namespace) -> int:
    """Check the lake file, list its snapshots, take one, or restore the newest readable one."""
    from finpipe.market import snapshots

    db = paths.lake_db_path()
    if args.action == "check":
        health = snapshots.check(db)
        if not health.ok:
            print(f"lake {db}: DAMAGED: {health.problem}")
            print("restore the newest readable snapshot with: finpipe lake restore")
            return EXIT_LAKE_CORRUPT
        print(f"lake {db}: ok (" + ", ".join(f"{t} {n:,}" for t, n in health.tables.items()) + ")")
    elif args.action == "snapshot":
        print(f"snapshot: {snapshots.snapshot(db)}")
    elif args.action == "restore":  # only a damaged lake, unless forced; never while another process holds it
        done = snapshots.restore(db, Path(args.snapshot) if args.snapshot else None, force=args.force,
                                 log=lambda line: print(f"finpipe: {line}", file=sys.stderr))
        kept = f"; the {'damaged' if done.damaged else 'replaced'} file is kept as {done.aside}" if done.aside else ""
        print(f"restored {db} from {done.snapshot}{kept}")
    for path in snapshots.list_snapshots(db) if args.action in ("check", "list") else []:
        print(f"snapshot: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


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


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a model on the lake's golden set twice: with each sample's ideal context, and end to end (the question
    alone through the answering path `ask` and `serve` use), plus the wild part; print the parts side by side."""
    import json

    from finpipe.evaluation.end_to_end import E2E_METRICS, UNANSWERABLE, UNANSWERABLE_METRICS, build_set
    from finpipe.evaluation.evaluate import HEADLINE_METRICS, EvalSpec, evaluate_model
    from finpipe.instructions.samples import read_jsonl
    from finpipe.market.lake import PriceLake

    choice = _resolve_model(args.adapter)
    golden_file = paths.DatasetFiles.of(paths.lake_dir()).golden
    if not golden_file.exists():
        raise FileNotFoundError(f"no golden set at {golden_file}: run `finpipe run` first")
    golden = read_jsonl(golden_file)
    questions = build_set(golden, PriceLake(paths.lake_db_path()))
    label, base_dir, adapter_dir = choice
    _quiet_transformers()
    scores = evaluate_model(label, str(base_dir), str(adapter_dir) if adapter_dir else None, [], golden, EvalSpec(),
                            log=lambda line: print(f"finpipe: {line}", file=sys.stderr), with_val=False,
                            with_forgetting=False, end_to_end=questions, retry=args.on_unverified == "retry")
    shown = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    ideal = scores.golden.overall
    print(f"{label}: golden set, ideal context (n={len(golden)}): "
          + ", ".join(f"{k} {shown(ideal.get(k))}" for k in HEADLINE_METRICS))
    summary = scores.end_to_end["summary"]
    for part, got in summary["parts"].items():
        metrics = UNANSWERABLE_METRICS if part == UNANSWERABLE else E2E_METRICS
        print(f"{label}: end to end, {part} (n={got['n']}): " + ", ".join(
            f"{k} {shown(got['means'].get(k))} [{', '.join(shown(x) for x in got['ci'].get(k) or [])}]"
            for k in metrics))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": label, "golden": scores.golden.as_dict()
                                               | {"rows": scores.golden.rows}, "end_to_end": scores.end_to_end},
                                              indent=1))
        print(f"answers and scores: {args.json}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """Print the run registry: every evaluated adapter, its metrics and promotion status."""
    if args.limit < 1:  # polars reads a negative row count as "all rows", and 0 prints an empty table
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    db = paths.lake_db_path()
    if not db.exists():  # do not create a lake just to report it is empty
        print(f"no runs yet (no lake at {db}): `finpipe run` trains and registers one")
        return 0
    import polars as pl

    from finpipe.market.lake import PriceLake
    from finpipe.models.registry import RunRegistry

    lake = PriceLake(db)
    # RunRegistry.runs() creates the table on a write connection; a lake without runs is only read
    tables = lake.query("SELECT table_name FROM information_schema.tables")["table_name"].to_list()
    runs = RunRegistry(lake).runs() if "model_runs" in tables else None
    if runs is None or runs.height == 0:
        print("no runs yet: `finpipe run` trains and registers one")
        return 0
    frame = runs.select([pl.col(c).alias(h) for c, h in RUNS_COLUMNS.items() if c in runs.columns]).with_columns(
        pl.selectors.float().round(4), pl.col("created").dt.strftime("%Y-%m-%d %H:%M"))
    with pl.Config(tbl_rows=args.limit, tbl_cols=-1, tbl_width_chars=200, fmt_str_lengths=60,
                   tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True):
        print(frame.head(args.limit))
    if runs.height > args.limit:
        print(f"({runs.height - args.limit} older runs not shown; --limit to see more)")
    return 0


def _inference_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", default="champion",
                        help="champion (default), latest, none (base model only) or an adapter folder")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0; 1 = none")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="answer length limit")
    parser.add_argument("--allow-ungrounded", action="store_true",
                        help="answer questions that name no ticker of the lake (no market data) instead of refusing")


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


def build_parser() -> argparse.ArgumentParser:
    from finpipe.evaluation.evaluate import EvalSpec
    from finpipe.inference.answering import AnswerSpec
    from finpipe.settings import add_options
    from finpipe.settings import help_with_default as _spec_help
    from finpipe.studies.compression import CompressionSpec
    from finpipe.studies.peft_study import PeftStudySpec
    from finpipe.training.spec import QUANTIZATIONS, AdapterSpec

    parser = argparse.ArgumentParser(prog="finpipe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="materialize the pipeline (default: offline replay data)")
    run.add_argument("--start", type=_parse_date, help="first date to ingest (default: END - 2 years)")
    run.add_argument("--end", type=_parse_date, help="last date to ingest (default: the source's last date, or today)")
    run.add_argument("--source", choices=["replay", "yahoo", "simulated"], help="overrides FINPIPE_SOURCE")
    run.add_argument("--universe", help="overrides FINPIPE_UNIVERSE (us_core, us_large_cap, india)")
    run.add_argument("--tickers", help="comma-separated tickers replacing the universe's (overrides FINPIPE_TICKERS)")
    run.add_argument("--only-lake", action="store_true", help="stop after ingesting prices")
    run.add_argument("--only-data", action="store_true", help="stop after the datasets (no model training)")
    run.add_argument("--base", default="smollm2",
                     help="base model: smollm2 (embedded), scratch (finpipe's own GPT), a hub id or a local folder")
    # options that set a spec field take its help and default from the spec (finpipe.settings: declared once)
    run.add_argument("--quantization", choices=QUANTIZATIONS, help=_spec_help(AdapterSpec, "quantization"))
    run.add_argument("--train-minutes", type=float, help=_spec_help(AdapterSpec, "max_minutes"))
    run.add_argument("--max-steps", type=int, help=_spec_help(AdapterSpec, "max_steps"))
    run.add_argument("--warm-start", action="store_true",
                     help="continue from the champion's weights (as the nightly run does) instead of a fresh adapter")
    run.add_argument("--eval-max-new-tokens", type=int, help=_spec_help(EvalSpec, "max_new_tokens"))
    run.add_argument("--config", metavar="YAML", help="run config for the model stage (the Launchpad's format), e.g. "
                     "configs/train-60-minutes.yaml; the options above override it")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.set_defaults(func=cmd_run)

    ui = sub.add_parser("ui", help="start the Dagster UI (dg dev) on 127.0.0.1")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(func=cmd_ui)

    sql = sub.add_parser("sql", help="run a read-only SQL query against the lake")
    sql.add_argument("query")
    sql.add_argument("--limit", type=int, default=50, help="rows to print")
    sql.add_argument("--lock-timeout", type=float, default=5.0, help="seconds to wait for a run that holds the lake")
    sql.set_defaults(func=cmd_sql)

    ask = sub.add_parser("ask", help="answer a question with the champion adapter, grounded in the lake")
    ask.add_argument("question", help='e.g. "What is AAPL\'s trend?" (tickers named get their latest facts)')
    _inference_options(ask)
    ask.add_argument("--show-prompt", action="store_true", help="print the prompt the model sees")
    ask.add_argument("--server", default="auto", metavar="URL", help="a running `finpipe serve` to ask when it serves "
                     "this lake's champion with the same policy: auto (http://127.0.0.1:8000, default), a URL, or "
                     "off (always load the model here)")
    add_options(ask, AnswerSpec)
    ask.set_defaults(func=cmd_ask)

    chat = sub.add_parser("chat", help="interactive questions from stdin (exit, quit or EOF ends)")
    _inference_options(chat)
    chat.add_argument("--show-prompt", action="store_true", help="print each prompt the model sees")
    add_options(chat, AnswerSpec)
    chat.set_defaults(func=cmd_chat)

    demo = sub.add_parser("demo", help="preset questions: base model vs adapter side by side")
    _inference_options(demo)
    demo.set_defaults(func=cmd_demo)

    export = sub.add_parser("export", help="merge the adapter into its base: a Hugging Face folder or GGUF + Ollama")
    export.add_argument("--merged", metavar="DIR", help="write a plain Hugging Face model folder")
    export.add_argument("--gguf", metavar="DIR", help="write GGUF files, an Ollama Modelfile and a model card, and "
                        "check that each file answers the golden questions like the merged model")
    export.add_argument("--gguf-types", default="bf16,q8_0", help="GGUF types to write: f32, f16, bf16, q8_0")
    export.add_argument("--parity-samples", type=int, default=0, help="golden questions for the parity check "
                        "(default: all)")
    export.add_argument("--adapter", default="champion", help="champion (default), latest or an adapter folder")
    export.add_argument("--force", action="store_true", help="replace a previous finpipe export in DIR (never "
                        "anything else)")
    export.set_defaults(func=cmd_export)

    serve_parser = sub.add_parser("serve", help="an OpenAI-compatible chat server for the champion, grounded in the "
                                  "lake, verifying every number it states")
    from finpipe.serving.app import ServeSpec

    add_options(serve_parser, ServeSpec)
    serve_parser.set_defaults(func=cmd_serve)

    lake = sub.add_parser("lake", help="check the lake file, list, take or restore its snapshots")
    lake.add_argument("action", choices=["check", "list", "snapshot", "restore"])
    lake.add_argument("--snapshot", help="with restore: this snapshot file (default: the newest readable one)")
    lake.add_argument("--force", action="store_true", help="with restore: replace the lake even though `lake check` "
                      "finds it healthy (what it rolls back is printed first; the replaced file is kept)")
    lake.set_defaults(func=cmd_lake)

    evaluate = sub.add_parser("evaluate", help="score a model on the golden set with the ideal context and end to end "
                              "(questions alone through the answering path, plus the wild part)")
    evaluate.add_argument("--adapter", default="champion",
                          help="champion (default), latest, none (base model only) or an adapter folder")
    evaluate.add_argument("--json", metavar="FILE", help="also write every answer with its scores to FILE")
    evaluate.add_argument("--on-unverified", choices=["flag", "retry"], default="flag",
                          help="answer end to end with this policy (retry: unverified answers are sampled again, up to "
                          "twice, and the first verified one kept; default: flag)")
    evaluate.set_defaults(func=cmd_evaluate)

    runs = sub.add_parser("runs", help="print the run registry (evaluated adapters, metrics, status)")
    runs.add_argument("--limit", type=int, default=50, help="rows to print")
    runs.set_defaults(func=cmd_runs)

    study = sub.add_parser("study", help="the PEFT method comparison and the compression study (after `run`)")
    study.add_argument("--methods", help="comma-separated subset of lora,qlora,adalora,vblora,dora,ia3 (default all)")
    study.add_argument("--max-steps", type=int, help=_spec_help(PeftStudySpec, "max_steps"))
    study.add_argument("--drop", default=",".join(map(str, CompressionSpec.ks)), help=_spec_help(CompressionSpec, "ks"))
    study.add_argument("--heal-steps", type=int, help=_spec_help(CompressionSpec, "heal_steps"))
    study.add_argument("--skip-peft", action="store_true")
    study.add_argument("--skip-compression", action="store_true")
    study.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    study.set_defaults(func=cmd_study)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from finpipe.market.lake import (
        CorruptLakeError,
        LakeLockedError,  # after parsing: `finpipe --help` stays instant
    )

    try:
        with _quiet_interrupts():
            return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: one line; training resumes from its last checkpoint on the next run
        print("\nfinpipe: interrupted; run the same command again to continue (training resumes from its last "
              "checkpoint)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `finpipe sql ... | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # bad input or configuration: one clear line
        return EXIT_BAD_INPUT
    except LakeLockedError as exc:  # another process (a run, a duckdb shell) holds the lake
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_LAKE_LOCKED
    except CorruptLakeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_LAKE_CORRUPT
    except Exception as exc:  # not foreseen: still one line, with the way to the traceback a bug report needs
        if os.environ.get("FINPIPE_DEBUG", "").strip().lower() in ("1", "true", "yes"):  # not "0", not "false"
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"error: {type(exc).__name__}: {first} (unexpected; FINPIPE_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
