"""The ``finpipe`` command line.

One module per command group, each importing what it needs inside its commands, so ``finpipe --help``, ``runs``
and ``sql`` start at once (tested) and each command's cost is its own:

- ``finpipe.cli.run``: ``run``, ``study``, ``ui`` (Dagster runs and their console);
- ``finpipe.cli.lake``: ``sql``, ``lake``, ``runs``;
- ``finpipe.cli.answers``: ``ask``, ``chat``, ``demo``, ``evaluate``;
- ``finpipe.cli.shipping``: ``export``, ``serve``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

#: when the command line started (``ask --timings`` counts from here)
STARTED = time.perf_counter()

#: exit codes: 1 a run failed (its log says why), 2 bad input or configuration, 3 the lake is held by another
#: process, 4 the lake file is unreadable, 5 the address `finpipe serve` would listen on is in use, 130 interrupted;
#: `finpipe reproduce`: 6 the rebuilt data differs from the run's, 7 a metric outside its recorded interval
EXIT_UNEXPECTED, EXIT_BAD_INPUT, EXIT_LAKE_LOCKED, EXIT_LAKE_CORRUPT, EXIT_INTERRUPTED = 1, 2, 3, 4, 130
EXIT_ADDRESS_IN_USE = 5


def build_parser() -> argparse.ArgumentParser:
    from finpipe.cli.answers import _inference_options, cmd_ask, cmd_chat, cmd_demo, cmd_evaluate
    from finpipe.cli.lake import cmd_lake, cmd_reproduce, cmd_runs, cmd_sql
    from finpipe.cli.run import DEFAULT_HISTORY_DAYS, _parse_date, cmd_run, cmd_study, cmd_ui
    from finpipe.cli.shipping import cmd_export, cmd_serve
    from finpipe.evaluation.evaluate import EvalSpec
    from finpipe.inference.answering import AnswerSpec
    from finpipe.settings import add_options
    from finpipe.settings import help_with_default as _spec_help
    from finpipe.studies.compression import CompressionSpec
    from finpipe.studies.peft_study import PeftStudySpec
    from finpipe.tracking import TrackingSpec
    from finpipe.training.spec import QUANTIZATIONS, AdapterSpec

    parser = argparse.ArgumentParser(prog="finpipe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="materialize the pipeline (default: offline replay data)")
    run.add_argument("--start", type=_parse_date,
                     help=f"first date to ingest (default: END - {DEFAULT_HISTORY_DAYS // 365} years)")
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
    run.add_argument("--mlflow", action="store_true",
                     help=_spec_help(TrackingSpec, "enabled", "off") + "; or FINPIPE_MLFLOW=1 (docs/tracking.md)")
    run.add_argument("--mlflow-tracking-uri", metavar="URI", help=_spec_help(TrackingSpec, "tracking_uri", "the lake's")
                     + "; turns tracking on; or FINPIPE_MLFLOW_TRACKING_URI")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.add_argument("--verbose", action="store_true", help="Dagster's full prefix on every line (job, run id, step) "
                     "and the libraries' progress bars")
    run.set_defaults(func=cmd_run)

    ui = sub.add_parser("ui", help="start the Dagster UI (dg dev) on 127.0.0.1")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, help="3000 for Dagster's UI, 5000 for MLflow's")
    ui.add_argument("--mlflow", action="store_true", help="MLflow's UI instead, on the runs finpipe tracked (the lake's "
                    "store, or FINPIPE_MLFLOW_TRACKING_URI): docs/tracking.md")
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
    ask.add_argument("--timings", action="store_true",
                     help="print where the time went (start-up, lake, torch import, weights, prefill, decode) on stderr")
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

    repro = sub.add_parser("reproduce", help="rebuild a run's data from the lake as it was, check its hashes, retrain "
                           "it and compare the metrics with the recorded intervals (docs/tracking.md); exit 0 when "
                           "identical data and metrics within interval, 6 data differs, 7 a metric outside its interval")
    repro.add_argument("run", help="a run id (`finpipe runs`), champion or latest")
    repro.add_argument("--skip-training", action="store_true", help="only rebuild the data and check its hashes")
    repro.add_argument("--json", action="store_true", help="the report as JSON")
    repro.set_defaults(func=cmd_reproduce)

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
    code = _run(args)
    if argv is None and getattr(args, "exit_at_once", False):  # the console command, its answer printed
        _exit_at_once(code)
    return code


def _exit_at_once(code: int) -> None:
    """End the process now: tearing torch and its thread pools down cost ``ask`` about a second after the answer
    was printed. Only what an exit must still do is done: output flushed, this process's core share given back."""
    from finpipe.runtime import release_cpu_share

    release_cpu_share()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _run(args: argparse.Namespace) -> int:
    from finpipe.cli.run import _quiet_interrupts
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

