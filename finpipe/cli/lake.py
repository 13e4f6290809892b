"""`finpipe sql`, `lake` and `runs`: reading the lake, checking and restoring it, and the run registry. Nothing here
imports torch, pandas or Dagster (tested): these commands answer at once."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from finpipe import paths
from finpipe.cli import EXIT_LAKE_CORRUPT

#: model_runs column -> its header in `finpipe runs` (short, so a run fits on one terminal line)
RUNS_COLUMNS = {"run_id": "run_id", "created_at": "created", "status": "status", "base_model": "base",
                "quantization": "quant", "train_last": "train_last", "val_cutoff": "val_cutoff",
                "val_loss": "val_loss", "golden_number_correctness": "numbers", "golden_label_correctness": "labels",
                "golden_exact_match": "exact", "forgetting_probe": "probe", "train_tokens": "tokens",
                "run_trigger": "trigger", "reason": "reason", "trigger_reason": "trigger_reason"}


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


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Rebuild a recorded run (finpipe.reproduce) and print what matched; the exit code says the verdict."""
    db = paths.lake_db_path()
    if not db.exists():
        raise FileNotFoundError(f"no lake at {db}: nothing to reproduce")
    from finpipe.cli.run import _quiet_progress_bars
    from finpipe.reproduce import render, reproduce

    _quiet_progress_bars(False)  # finpipe says what each step does; the libraries' bars would bury the verdict
    report = reproduce(paths.lake_dir(), args.run, skip_training=args.skip_training,
                       log=(lambda line: None) if args.json else (lambda line: print(f"  {line}", flush=True)))
    if args.json:
        import json

        print(json.dumps(report.as_dict(), indent=1, default=str))
    else:
        print(render(report))
    return report.exit_code
