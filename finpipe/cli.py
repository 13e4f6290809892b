"""The ``finpipe`` command line.

Heavy imports (Dagster, ML libraries) happen inside the commands, so ``finpipe --help`` is instant.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

from finpipe import paths

DEFAULT_HISTORY_DAYS = 730  # two years of sessions for the quickstart lake


def _prepare_dagster_home() -> Path:
    """A persistent Dagster instance under the lake, so `finpipe run` history shows in `finpipe ui`."""
    home = paths.dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
    return home


def _parse_date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date (YYYY-MM-DD): {value!r}") from None


def cmd_run(args: argparse.Namespace) -> int:
    """Materialize the pipeline on the configured source (default: the offline replay)."""
    _prepare_dagster_home()
    if args.source:
        os.environ["FINPIPE_SOURCE"] = args.source
    if args.universe:
        os.environ["FINPIPE_UNIVERSE"] = args.universe
    if args.tickers:
        os.environ["FINPIPE_TICKERS"] = args.tickers

    import dagster as dg

    from finpipe.defs.market_data import daily_prices, market_data_checks
    from finpipe.defs.partitions import PARTITION_RANGE_END_TAG, PARTITION_RANGE_START_TAG
    from finpipe.definitions import DERIVED_ASSETS, DERIVED_CHECKS, MODEL_ASSETS, build_resources

    resources = build_resources()
    market = resources["market_data"]
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
    # Run 3: base model and adapter.
    print(f"finpipe: [1/3] ingesting {market.universe} from {source.name}, {first_key} .. {last_key}")
    ingest = dg.materialize(
        [daily_prices, *market_data_checks], resources=resources, instance=instance, raise_on_error=False,
        tags={PARTITION_RANGE_START_TAG: first_key, PARTITION_RANGE_END_TAG: last_key}, run_config=run_config,
    )
    if not _report(ingest, "ingestion"):
        return 1
    lake = resources["lake"]
    print(lake.prices_lake().query(
        "SELECT ticker, count(*) AS rows, min(date) AS first, max(date) AS last, any_value(source) AS source "
        "FROM prices GROUP BY ticker ORDER BY ticker"
    ))
    print(f"lake: {lake.db_path}")
    if args.only_lake:
        return 0

    print("finpipe: [2/3] statistics, instruction samples (quality gates), train/validation split")
    derived = dg.materialize([*DERIVED_ASSETS, *DERIVED_CHECKS], resources=resources, instance=instance,
                             raise_on_error=False, run_config=run_config)
    if not _report(derived, "derived assets"):
        return 1
    split = derived.asset_materializations_for_node("dataset_split")[0].metadata
    print(f"datasets: {split['train_samples'].value} train / {split['val_samples'].value} val samples, "
          f"cutoff {split['cutoff'].value}")
    print(f"train: {split['train_path'].value}")
    print(f"val:   {split['val_path'].value}")
    if args.only_data:
        return 0

    from finpipe.defs.models import scratch_gpt

    if args.base == "scratch":  # finpipe's own GPT is pretrained first, in its own run
        print("finpipe: pretraining finpipe's own GPT (scratch_gpt)")
        if not _report(dg.materialize([scratch_gpt], resources=resources, instance=instance, raise_on_error=False,
                                      run_config=run_config), "scratch GPT"):
            return 1
    assets = MODEL_ASSETS
    ops = {"base_model": {"config": {"model": args.base}},
           "qlora_adapter": {"config": {"quantization": args.quantization, "max_steps": args.max_steps}}}
    print(f"finpipe: [3/3] base model ({args.base}) and {args.quantization} adapter ({args.max_steps} steps)")
    models = dg.materialize(assets, resources=resources, instance=instance, raise_on_error=False,
                            run_config=run_config | {"ops": ops})
    if not _report(models, "model"):
        return 1
    adapter = {k: v.value for k, v in models.asset_materializations_for_node("qlora_adapter")[0].metadata.items()}
    print(f"adapter: {adapter['path']}")
    print(f"  validation loss {adapter['initial_val_loss']} -> {adapter['best_val_loss']} in {adapter['steps']} steps, "
          f"{adapter['wall_time_s']} s, {adapter['tokens_per_s']} tokens/s, peak {adapter['peak_memory_mb']} MB, "
          f"{adapter['device']} {adapter['precision']}")
    return 0


def _report(result, what: str) -> bool:
    failed_checks = [c.check_name for c in result.get_asset_check_evaluations() if not c.passed]
    if failed_checks:
        print(f"finpipe: {what}: checks failed: {', '.join(failed_checks)}", file=sys.stderr)
    if not result.success:
        print(f"finpipe: the {what} run failed; see the log above (or `finpipe ui`, Runs tab).", file=sys.stderr)
    return result.success and not failed_checks


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
    """Start the Dagster UI on 127.0.0.1 with finpipe's persistent instance."""
    _prepare_dagster_home()
    argv = ["dagster", "dev", "-w", str(paths.REPO_ROOT / "workspace.yaml"), "-h", args.host, "-p", str(args.port)]
    os.chdir(paths.REPO_ROOT)
    os.execvp(argv[0], argv)
    return 0  # not reached


def cmd_sql(args: argparse.Namespace) -> int:
    """Run a read-only SQL query against the lake."""
    import polars as pl

    from finpipe.market.lake import PriceLake

    frame = PriceLake(paths.lake_db_path()).query(args.query)
    with pl.Config(tbl_rows=args.limit, tbl_cols=-1, tbl_width_chars=200):
        print(frame)
    return 0


def build_parser() -> argparse.ArgumentParser:
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
    run.add_argument("--quantization", default="nf4", choices=["nf4", "none"], help="nf4 = QLoRA, none = LoRA")
    run.add_argument("--max-steps", type=int, default=24, help="adapter training steps")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.set_defaults(func=cmd_run)

    ui = sub.add_parser("ui", help="start the Dagster UI (dagster dev) on 127.0.0.1")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(func=cmd_ui)

    sql = sub.add_parser("sql", help="run a read-only SQL query against the lake")
    sql.add_argument("query")
    sql.add_argument("--limit", type=int, default=50, help="rows to print")
    sql.set_defaults(func=cmd_sql)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # configuration and input errors: one clear line
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
