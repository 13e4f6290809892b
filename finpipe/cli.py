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
    from finpipe.definitions import DERIVED_ASSETS, DERIVED_CHECKS, MODEL_ASSETS, MODEL_CHECKS, build_resources

    resources = build_resources()
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
           "qlora_adapter": {"config": {"quantization": args.quantization, "max_steps": args.max_steps}},
           "adapter_evaluation": {"config": {"max_new_tokens": args.eval_max_new_tokens}}}
    print(f"finpipe: [3/3] base model ({args.base}), {args.quantization} adapter ({args.max_steps} steps), "
          "evaluation, report, promotion")
    models = dg.materialize([*assets, *MODEL_CHECKS], resources=resources, instance=instance, raise_on_error=False,
                            run_config=run_config | {"ops": ops})
    if not _report(models, "model"):
        return 1
    adapter = {k: v.value for k, v in models.asset_materializations_for_node("qlora_adapter")[0].metadata.items()}
    print(f"adapter: {adapter['path']}")
    print(f"  validation loss {adapter['initial_val_loss']} -> {adapter['best_val_loss']} in {adapter['steps']} steps, "
          f"{adapter['wall_time_s']} s, {adapter['tokens_per_s']} tokens/s, peak {adapter['peak_memory_mb']} MB, "
          f"{adapter['device']} {adapter['precision']}")
    meta = lambda node: {k: v.value for k, v in models.asset_materializations_for_node(node)[0].metadata.items()}  # noqa: E731
    evaluation, promotion, report = meta("adapter_evaluation"), meta("champion_adapter"), meta("evaluation_report")
    print(f"evaluation: validation loss base {evaluation['base_val_loss']} -> adapter {evaluation['adapter_val_loss']}; "
          f"numeric fidelity base {evaluation['base_numeric_fidelity']} -> adapter {evaluation['adapter_numeric_fidelity']}")
    print(("promotion: promoted " if promotion["promoted"] else "promotion: kept the champion, ")
          + f"{promotion['challenger'] if promotion['promoted'] else promotion['champion'] or 'none'} ({promotion['reason']})")
    print(f"report: {report['html']}")
    return 0


def _report(result, what: str) -> bool:
    import dagster as dg

    evaluations = [c for c in result.get_asset_check_evaluations() if not c.passed]
    failed_checks = [c.check_name for c in evaluations if c.severity != dg.AssetCheckSeverity.WARN]
    warnings = [c.check_name for c in evaluations if c.severity == dg.AssetCheckSeverity.WARN]
    if warnings:
        print(f"finpipe: {what}: warnings from checks: {', '.join(warnings)}", file=sys.stderr)
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


# --------------------------------------------------------------------------- inference: ask, chat, demo, export, runs

#: model_runs column -> its header in `finpipe runs` (short, so a run fits on one terminal line)
RUNS_COLUMNS = {"run_id": "run_id", "created_at": "created", "status": "status", "base_model": "base",
                "quantization": "quant", "train_last": "train_last", "val_cutoff": "val_cutoff",
                "val_loss": "val_loss", "base_val_loss": "base_val_loss", "golden_numeric_fidelity": "numeric_fid",
                "golden_label_accuracy": "label_acc", "golden_rouge_l": "rouge_l", "reason": "reason"}


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
        base = registry.read_pointer(pointer)
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


def _load(choice: tuple[str, Path, Path | None], merge: bool = True):
    """(label, model, tokenizer) for a ``_resolve_model`` choice; the adapter merged unless the caller needs
    to switch it off (the demo compares with the base)."""
    from finpipe.evaluation.generation import load_chat_model

    _quiet_transformers()
    label, base_dir, adapter_dir = choice
    print(f"finpipe: loading {label} ({base_dir}{' + ' + str(adapter_dir) if adapter_dir else ''})", file=sys.stderr)
    model, tokenizer = load_chat_model(base_dir, adapter_dir, merge=merge)
    return label, model, tokenizer


def _answer(question: str, facts, model, tokenizer, sampling, label: str, show_prompt: bool) -> None:
    """Ground, generate, print: the answer on stdout (pipeable), notes and speed on stderr."""
    from finpipe.evaluation.generation import generate
    from finpipe.inference.context import ground

    grounding = ground(question, facts)
    for note in grounding.notes:
        print(f"finpipe: {note}", file=sys.stderr)
    messages = grounding.messages()
    if show_prompt:
        print("--- prompt ---")
        print(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), end="")
        print("\n--- answer ---")
    out = generate(model, tokenizer, messages, sampling)
    print(out.text)
    print(f"finpipe: [{label}: {out.new_tokens} tokens in {out.seconds:.1f} s, {out.tokens_per_s:.1f} tokens/s]",
          file=sys.stderr)


def cmd_ask(args: argparse.Namespace) -> int:
    """Answer one question, grounded in the lake's latest facts for the tickers it names."""
    sampling = _sampling(args)
    choice = _resolve_model(args.adapter)  # cheap checks first: pointers, lake, then the model
    facts = _facts()
    facts.tickers()
    label, model, tokenizer = _load(choice)
    _answer(args.question, facts, model, tokenizer, sampling, label, args.show_prompt)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Answer questions read line by line from stdin until EOF, `exit` or `quit` (model loaded once)."""
    sampling = _sampling(args)
    choice = _resolve_model(args.adapter)
    facts = _facts()
    known = facts.tickers()
    label, model, tokenizer = _load(choice)
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
            _answer(question, facts, model, tokenizer, sampling, label, args.show_prompt)
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
    from finpipe.inference.context import demo_questions, ground

    if args.adapter == "none":
        raise ValueError("demo compares the base model with an adapter: --adapter none leaves nothing to compare")
    sampling = _sampling(args)
    choice = _resolve_model(args.adapter)
    facts = _facts()
    questions = demo_questions(facts.tickers())
    label, model, tokenizer = _load(choice, merge=False)  # disable_adapter() gives the base model
    width = min(shutil.get_terminal_size((120, 24)).columns, 160)
    for i, (family, question) in enumerate(questions, 1):
        grounding = ground(question, facts)
        messages = grounding.messages()
        tuned = generate(model, tokenizer, messages, sampling)
        with model.disable_adapter():  # the same weights without the adapter: the base model
            base = generate(model, tokenizer, messages, sampling)
        print("=" * width)
        print(f"[{i}/{len(questions)}] {family}: {', '.join(grounding.tickers)} as of {grounding.as_of}")
        print(f"Q: {question}")
        print(f"reference: {grounding.reference or '(no reference)'}")
        print("-" * width)
        print(_columns("base model", label, width))
        print(_columns(base.text or "(empty)", tuned.text or "(empty)", width))
    print("=" * width)
    print("reference = the rule-based answer from the lake's facts (what the training samples teach)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Merge the adapter into its base and write a plain Hugging Face model folder."""
    from finpipe.inference.export import export_merged

    if args.adapter == "none":
        raise ValueError("export merges an adapter: --adapter none has nothing to merge")
    label, base_dir, adapter_dir = _resolve_model(args.adapter)
    print(f"finpipe: merging {label} into {base_dir}", file=sys.stderr)
    _quiet_transformers()
    report = export_merged(base_dir, adapter_dir, Path(args.merged), force=args.force,
                           provenance={"adapter_label": label})
    print(f"exported: {report.path} ({report.parameters:,} parameters, {report.dtype}, "
          f"{report.size_bytes / 1e6:.1f} MB)")
    print(f"load with: AutoModelForCausalLM.from_pretrained({str(report.path)!r})")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """Print the run registry: every evaluated adapter, its metrics and promotion status."""
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


def cmd_study(args: argparse.Namespace) -> int:
    """Both studies on the current lake: one run per PEFT method partition, the comparison, the compression."""
    _prepare_dagster_home()
    import dagster as dg

    from finpipe.definitions import build_resources
    from finpipe.defs.studies import compression_study, peft_comparison, peft_method_run
    from finpipe.studies.peft_study import STUDY_METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(STUDY_METHODS)
    unknown = sorted(set(methods) - set(STUDY_METHODS))
    if unknown:
        raise ValueError(f"unknown PEFT methods {unknown}; the study covers {', '.join(STUDY_METHODS)}")
    resources, instance = build_resources(), dg.DagsterInstance.get()
    run_config = {"loggers": {"console": {"config": {"log_level": args.log_level}}}}
    peft_ops = {"ops": {"peft_method_run": {"config": {"max_steps": args.max_steps}}}}
    reports = []
    if not args.skip_peft:
        for i, method in enumerate(methods, 1):
            print(f"finpipe: [peft {i}/{len(methods)}] {method}")
            done = dg.materialize([peft_method_run], partition_key=method, resources=resources, instance=instance,
                                  raise_on_error=False, run_config=run_config | peft_ops)
            if not _report(done, f"{method} study"):
                return 1
        done = dg.materialize([peft_comparison], resources=resources, instance=instance, raise_on_error=False,
                              run_config=run_config)
        if not _report(done, "PEFT comparison"):
            return 1
        reports.append(done.asset_materializations_for_node("peft_comparison")[0].metadata["html"].value)
    if not args.skip_compression:
        print("finpipe: [compression] the champion: PTQ variants and successive layer dropping")
        ops = {"ops": {"compression_study": {"config": {"ks": [int(k) for k in args.drop.split(",")],
                                                         "heal_steps": args.heal_steps}}}}
        done = dg.materialize([compression_study], resources=resources, instance=instance, raise_on_error=False,
                              run_config=run_config | ops)
        if not _report(done, "compression study"):
            return 1
        reports.append(done.asset_materializations_for_node("compression_study")[0].metadata["html"].value)
    for path in reports:
        print(f"report: {path}")
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
    run.add_argument("--eval-max-new-tokens", type=int, default=80,
                     help="longest generated answer in the evaluation (greedy)")
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

    ask = sub.add_parser("ask", help="answer a question with the champion adapter, grounded in the lake")
    ask.add_argument("question", help='e.g. "What is AAPL\'s trend?" (tickers named get their latest facts)')
    _inference_options(ask)
    ask.add_argument("--show-prompt", action="store_true", help="print the prompt the model sees")
    ask.set_defaults(func=cmd_ask)

    chat = sub.add_parser("chat", help="interactive questions from stdin (exit, quit or EOF ends)")
    _inference_options(chat)
    chat.add_argument("--show-prompt", action="store_true", help="print each prompt the model sees")
    chat.set_defaults(func=cmd_chat)

    demo = sub.add_parser("demo", help="preset questions: base model vs adapter side by side")
    _inference_options(demo)
    demo.set_defaults(func=cmd_demo)

    export = sub.add_parser("export", help="merge the adapter into its base and write a plain HF model folder")
    export.add_argument("--merged", required=True, metavar="DIR", help="output folder")
    export.add_argument("--adapter", default="champion", help="champion (default), latest or an adapter folder")
    export.add_argument("--force", action="store_true", help="replace a previous export in DIR")
    export.set_defaults(func=cmd_export)

    runs = sub.add_parser("runs", help="print the run registry (evaluated adapters, metrics, status)")
    runs.add_argument("--limit", type=int, default=50, help="rows to print")
    runs.set_defaults(func=cmd_runs)

    study = sub.add_parser("study", help="the PEFT method comparison and the compression study (after `run`)")
    study.add_argument("--methods", help="comma-separated subset of lora,qlora,adalora,vblora,dora,ia3 (default all)")
    study.add_argument("--max-steps", type=int, default=8, help="training steps per PEFT method")
    study.add_argument("--drop", default="2,4", help="layers to drop in total, successively (e.g. 2,4)")
    study.add_argument("--heal-steps", type=int, default=8, help="LoRA healing steps after each drop (0 = none)")
    study.add_argument("--skip-peft", action="store_true")
    study.add_argument("--skip-compression", action="store_true")
    study.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    study.set_defaults(func=cmd_study)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from finpipe.market.lake import LakeLockedError  # after parsing: `finpipe --help` stays instant

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # configuration and input errors: one clear line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LakeLockedError as exc:  # another process (a run, a duckdb shell) holds the lake
        print(f"error: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
