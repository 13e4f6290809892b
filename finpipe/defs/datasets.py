"""Dataset assets: grounded chat samples (gated by Great Expectations) and the temporal train/val split."""

import datetime as dt
import json
from collections import Counter

import dagster as dg
import polars as pl
from pydantic import Field

from finpipe.defs.config import config_class
from finpipe.defs.metadata import markdown_table
from finpipe.defs.partitions import REFRESH_WHEN_PRICES_LAND
from finpipe.defs.resources import LakeResource
from finpipe.defs.statistics import STATISTICS_TABLE, price_statistics
from finpipe.instructions.builder import DatasetSpec, build_samples, family_counts
from finpipe.instructions.external import load_external
from finpipe.instructions.quality import GATES, validate_samples
from finpipe.instructions.samples import read_jsonl, write_jsonl
from finpipe.instructions.split import SplitSpec, temporal_split
from finpipe.instructions.tokens import estimate_tokens
from finpipe.models.files import atomic_write_text, file_digest
from finpipe.paths import DatasetFiles
from finpipe.runtime import heartbeat
from finpipe.settings import help_of


def spec_json(spec) -> dict:
    """A DatasetSpec or SplitSpec as JSON (dates as ISO text, tuples as lists), as the run registry records it."""
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(spec), default=str))


def dataset_files(lake: LakeResource) -> DatasetFiles:
    return DatasetFiles.of(lake.directory)


def gated_samples_digest(lake: LakeResource) -> str:
    """The digest of samples.jsonl, if its current content passed every gate; else a Failure saying what to run."""
    files = dataset_files(lake)
    samples, report = files.samples, files.gate_report
    if not samples.exists():
        raise dg.Failure(f"{samples} does not exist: materialize instruction_samples first")
    digest = file_digest(samples)
    try:
        verdict = json.loads(report.read_text())["finpipe"]
    except (OSError, ValueError, KeyError):
        raise dg.Failure(f"the samples in {samples} were never validated: materialize instruction_samples with its "
                         "checks (the quality gates) before the split") from None
    if verdict["samples_sha256"] != digest:
        raise dg.Failure(f"{samples} changed since its quality gates ran: materialize instruction_samples with its "
                         "checks again")
    if not verdict["passed"]:
        failed = ", ".join(g for g, ok in verdict["gates"].items() if not ok)
        raise dg.Failure(f"the samples failed their quality gates ({failed}): fix the data; the last good split "
                         "stays in place", metadata={"failed_gates": failed})
    return digest


def check_split_files(lake: LakeResource) -> dict:
    """split.json, after checking that train.jsonl and val.jsonl are exactly the files the split wrote."""
    files = dataset_files(lake)
    try:
        manifest = json.loads(files.split_manifest.read_text())
    except (OSError, ValueError):
        raise dg.Failure(f"{files.split_manifest} is missing or not JSON: materialize dataset_split") from None
    for side, path in (("train", files.train), ("val", files.val)):
        expected = (manifest.get("files") or {}).get(side)
        if expected is None:
            raise dg.Failure(f"{files.split_manifest} has no manifest for {path.name} (written by an older finpipe): "
                             "materialize dataset_split again")
        lines = sum(1 for _ in open(path, encoding="utf-8")) if path.exists() else 0
        if not path.exists() or file_digest(path) != expected["sha256"]:
            raise dg.Failure(f"{path} does not match its manifest ({lines} lines, expected {expected['samples']}; "
                             "truncated or edited since the split wrote it): materialize dataset_split again")
    return manifest


def split_and_golden(lake: LakeResource, golden_per_family: int, seed: int, paraphrase_share: float = 0.5):
    """(train, val, golden, created): the split files and the golden set, frozen from val on first use."""
    from finpipe.evaluation.golden import freeze_golden

    files = dataset_files(lake)
    train, val = read_jsonl(files.train), read_jsonl(files.val)
    golden, created = freeze_golden(val, files.golden, golden_per_family, seed, paraphrase_share)
    return train, val, golden, created


InstructionSamplesConfig = config_class(DatasetSpec, "InstructionSamplesConfig",
                                        only=("seed", "date_stride", "comparisons_per_date"), extra={
    "families": (list[str], Field(default=list(DatasetSpec.families), description=help_of(DatasetSpec, "families"))),
    "max_seq_len": (int, Field(default=512, description="token budget every sample must fit (the training max_seq_len)")),
    "external_path": (str, Field(default="", description="optional JSON/JSONL/CSV of extra instructions to merge")),
})


@dg.asset(
    deps=[price_statistics],
    group_name="datasets",
    automation_condition=REFRESH_WHEN_PRICES_LAND,
    kinds={"polars", "json"},
    description="Grounded chat samples {messages: [system, user, assistant]} with structured expected "
    "numbers and labels, rendered from price_statistics; written to datasets/samples.jsonl.",
)
def instruction_samples(context: dg.AssetExecutionContext, config: InstructionSamplesConfig,
                        lake: LakeResource) -> dg.MaterializeResult:
    if config.max_seq_len < 64:
        raise ValueError(f"max_seq_len must be >= 64, got {config.max_seq_len}")
    spec = DatasetSpec(seed=config.seed, date_stride=config.date_stride, families=tuple(config.families),
                       comparisons_per_date=config.comparisons_per_date)
    prices_lake = lake.prices_lake()
    stats = prices_lake.query(f"SELECT * FROM {STATISTICS_TABLE}")
    prices = prices_lake.query("SELECT ticker, date, open, high, low FROM prices")
    names = dict(prices_lake.query("SELECT ticker, name FROM instruments").iter_rows())
    context.log.info(f"rendering samples from {stats.height:,} statistics rows (every {spec.date_stride} sessions)")
    with heartbeat(context.log.info, "rendering samples"):
        samples = build_samples(stats, prices, names, spec)
    external = load_external(config.external_path) if config.external_path else []
    samples += external
    files = dataset_files(lake)
    write_jsonl(samples, files.samples)
    # what `finpipe reproduce` rebuilds these samples from: the spec and the last price date the lake held
    prices_through = max(prices["date"]) if prices.height else None
    manifest = {"config": config.model_dump(), "samples": len(samples), "families": family_counts(samples),
                "token_counter": "estimate", "spec": spec_json(spec),
                "prices_through": prices_through.isoformat() if prices_through else None}
    files.samples_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tokens = [estimate_tokens(s.messages) for s in samples]
    examples = "\n\n".join(
        f"**{s.family}** ({', '.join(s.tickers)} as of {s.as_of})\n\n```\n{s.text_of('user')}\n```\n\n> {s.text_of('assistant')}"
        for s in {s.family: s for s in samples}.values()
    )
    return dg.MaterializeResult(metadata={
        "dagster/row_count": len(samples),
        "path": dg.MetadataValue.path(str(files.samples)),
        "families": dg.MetadataValue.json(family_counts(samples)),
        "external_samples": len(external),
        "as_of_range": f"{min(s.as_of for s in samples if s.as_of)} .. {max(s.as_of for s in samples if s.as_of)}",
        "tokens_max": max(tokens),
        "tokens_mean": round(sum(tokens) / len(tokens), 1),
        "examples": dg.MetadataValue.md(examples),
    })


@dg.multi_asset_check(
    specs=[dg.AssetCheckSpec(f"samples_{gate}", asset=instruction_samples, blocking=True, description=text)
           for gate, text in GATES.items()],
)
def instruction_samples_quality(context: dg.AssetCheckExecutionContext, lake: LakeResource):
    """One Great Expectations suite; one blocking check per gate. Results saved as JSON beside the samples."""
    files = dataset_files(lake)
    samples = read_jsonl(files.samples)
    manifest = json.loads(files.samples_manifest.read_text())
    context.log.info(f"quality gates: Great Expectations on {len(samples):,} samples")
    with heartbeat(context.log.info, "quality gates"):
        result = validate_samples(samples, max_seq_len=manifest["config"]["max_seq_len"])
    report = files.gate_report
    report.parent.mkdir(parents=True, exist_ok=True)
    # the split reads this: it trains only on samples whose exact bytes passed every gate
    verdict = {"samples_sha256": file_digest(files.samples), "passed": result.passed,
               "gates": {g.name: g.passed for g in result.gates.values()}}
    atomic_write_text(report, json.dumps(result.raw | {"finpipe": verdict}, indent=1, default=str))
    for gate in result.gates.values():
        yield dg.AssetCheckResult(
            check_name=f"samples_{gate.name}",
            asset_key=instruction_samples.key,
            passed=gate.passed,
            description=gate.description,
            metadata={"failures": dg.MetadataValue.json(gate.failures), "report": dg.MetadataValue.path(str(report)),
                      "samples": len(samples)},
        )


DatasetSplitConfig = config_class(SplitSpec, "DatasetSplitConfig", only=("val_fraction", "embargo_days"), extra={
    "cutoff": (str, Field(default="", description=help_of(SplitSpec, "cutoff") + " (ISO date; empty: none)")),
})


@dg.asset(
    deps=[instruction_samples],
    group_name="datasets",
    automation_condition=REFRESH_WHEN_PRICES_LAND,
    kinds={"json"},
    description="Temporal split: val = samples dated after the cutoff; deduplicated; no text shared across "
    "sides; the frozen golden evaluation set is held out of both. Exports datasets/split/train.jsonl and val.jsonl.",
)
def dataset_split(context: dg.AssetExecutionContext, config: DatasetSplitConfig,
                  lake: LakeResource) -> dg.MaterializeResult:
    samples_digest = gated_samples_digest(lake)  # refuses samples whose gates did not pass (or never ran)
    cutoff = dt.date.fromisoformat(config.cutoff) if config.cutoff else None
    spec = SplitSpec(val_fraction=config.val_fraction, cutoff=cutoff, embargo_days=config.embargo_days)
    layout = dataset_files(lake)
    holdout = read_jsonl(layout.golden) if layout.golden.exists() else []  # the frozen evaluation set never trains
    split = temporal_split(read_jsonl(layout.samples), spec, holdout=holdout)
    train_path, val_path = layout.train, layout.val
    write_jsonl(split.train, train_path)
    write_jsonl(split.val, val_path)
    files = {side: {"samples": len(rows), "sha256": file_digest(path)}
             for side, rows, path in (("train", split.train, train_path), ("val", split.val, val_path))}
    atomic_write_text(layout.split_manifest, json.dumps({
        "cutoff": split.cutoff.isoformat(), "train": len(split.train), "val": len(split.val),
        "dropped": split.dropped, "files": files, "samples_sha256": samples_digest, "spec": spec_json(spec),
        # the golden set held out of this split (none before the first evaluation froze it): `finpipe reproduce`
        "holdout_sha256": file_digest(layout.golden) if holdout else None}, indent=2))
    train_counts, val_counts = Counter(s.family for s in split.train), Counter(s.family for s in split.val)
    table = pl.DataFrame([{"family": f, "train": train_counts.get(f, 0), "val": val_counts.get(f, 0)}
                          for f in sorted(set(train_counts) | set(val_counts))])

    def span(side):
        dates = [s.as_of for s in side if s.as_of]
        return f"{min(dates)} .. {max(dates)}" if dates else "undated only"

    return dg.MaterializeResult(metadata={
        "cutoff": split.cutoff.isoformat(),
        "train_samples": len(split.train),
        "val_samples": len(split.val),
        "train_dates": span(split.train),
        "val_dates": span(split.val),
        "dropped": dg.MetadataValue.json(split.dropped),
        "per_family": dg.MetadataValue.md(markdown_table(table)),
        "train_path": dg.MetadataValue.path(str(train_path)),
        "val_path": dg.MetadataValue.path(str(val_path)),
    })


@dg.asset_check(asset=dataset_split, blocking=True,
                description="No validation as-of date at or before the cutoff, no train date after it, no shared text.")
def split_has_no_leakage(lake: LakeResource) -> dg.AssetCheckResult:
    files = dataset_files(lake)
    train, val = read_jsonl(files.train), read_jsonl(files.val)
    cutoff = json.loads(files.split_manifest.read_text())["cutoff"]
    late_train = sum(1 for s in train if s.as_of and s.as_of > cutoff)
    early_val = sum(1 for s in val if not s.as_of or s.as_of <= cutoff)
    texts = lambda side: {s.text_of("user") for s in side} | {s.text_of("assistant") for s in side}  # noqa: E731
    shared = len(texts(train) & texts(val))
    return dg.AssetCheckResult(
        passed=late_train == early_val == shared == 0 and bool(train) and bool(val),
        metadata={"train_after_cutoff": late_train, "val_at_or_before_cutoff": early_val, "shared_texts": shared},
    )
