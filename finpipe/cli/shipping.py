"""`finpipe export` and `serve`: the champion as GGUF / a merged folder, and as an OpenAI-compatible server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finpipe import paths
from finpipe.cli import EXIT_ADDRESS_IN_USE
from finpipe.cli.answers import _quiet_transformers, _resolve_model


def _terminate_as_interrupt() -> None:
    """SIGTERM (``timeout``, a service manager, ``kill``) ends an export as Ctrl-C does: its temporary folders, hundreds
    of MB, are removed on the way out instead of being left hidden beside the target."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def cmd_export(args: argparse.Namespace) -> int:
    """Merge the adapter into its base: a plain Hugging Face folder (--merged) or GGUF files for llama.cpp and
    Ollama with a Modelfile, a model card and a parity check (--gguf)."""
    _terminate_as_interrupt()
    from finpipe.cli.run import _quiet_progress_bars

    _quiet_progress_bars(False)  # before tqdm is imported: the GGUF loader's own bar for every file the parity reads
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
    if result.passed:  # what `finpipe serve --engine auto|llama.cpp` finds and runs for this run
        from finpipe.inference.exported import export_pointer, record_export

        if record := record_export(lake_dir, payload["run_id"], result.files):
            print(f"recorded for `finpipe serve`: {export_pointer(lake_dir, payload['run_id'])} ({record.outtype}, "
                  f"sha256 {record.sha256[:12]}...)")
    else:
        print("not recorded for `finpipe serve`: the parity check failed", file=sys.stderr)
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
