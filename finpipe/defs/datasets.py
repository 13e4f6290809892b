"""Dataset assets: grounded chat samples (gated by Great Expectations) and the temporal train/val split."""

import datetime as dt
import json
from collections import Counter
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field

from finpipe.defs.metadata import markdown_table
from finpipe.defs.partitions import REFRESH_WHEN_PRICES_LAND
from finpipe.defs.resources import LakeResource
from finpipe.defs.statistics import STATISTICS_TABLE, price_statistics
from finpipe.instructions import families
from finpipe.instructions.builder import DatasetSpec, build_samples, family_counts
from finpipe.instructions.external import load_external
from finpipe.instructions.quality import GATES, validate_samples
from finpipe.instructions.samples import read_jsonl, write_jsonl
from finpipe.instructions.split import SplitSpec, temporal_split
from finpipe.instructions.tokens import estimate_tokens


def datasets_dir(lake: LakeResource) -> Path:
    return lake.directory / "datasets"


def samples_path(lake: LakeResource) -> Path:
    return datasets_dir(lake) / "samples.jsonl"


def manifest_path(lake: LakeResource) -> Path:
    return datasets_dir(lake) / "samples.manifest.json"


def split_dir(lake: LakeResource) -> Path:
    return datasets_dir(lake) / "split"


def golden_path(lake: LakeResource) -> Path:
    """The frozen golden evaluation set (written once by the evaluation asset)."""
    return datasets_dir(lake) / "golden.jsonl"


def split_and_golden(lake: LakeResource, golden_per_family: int, seed: int):
    """(train, val, golden, created): the split files and the golden set, frozen from val on first use."""
    from finpipe.evaluation.golden import freeze_golden

    train, val = read_jsonl(split_dir(lake) / "train.jsonl"), read_jsonl(split_dir(lake) / "val.jsonl")
    golden, created = freeze_golden(val, golden_path(lake), golden_per_family, seed)
    return train, val, golden, created


class InstructionSamplesConfig(dg.Config):
    seed: int = Field(default=42, description="fixes phrasings, horizons and pairs: same seed, same bytes")
    date_stride: int = Field(default=3, description="every Nth session (from the newest) is an as-of date")
    families: list[str] = Field(default=list(families.ALL_FAMILIES), description="question families to render")
    comparisons_per_date: int = Field(default=2, description="ticker pairs compared per as-of date")
    max_seq_len: int = Field(default=512, description="token budget every sample must fit (the training max_seq_len)")
    external_path: str = Field(default="", description="optional JSON/JSONL/CSV of extra instructions to merge")


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
    samples = build_samples(stats, prices, names, spec)
    external = load_external(config.external_path) if config.external_path else []
    samples += external
    path = samples_path(lake)
    write_jsonl(samples, path)
    manifest = {"config": config.model_dump(), "samples": len(samples), "families": family_counts(samples),
                "token_counter": "estimate"}
    manifest_path(lake).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tokens = [estimate_tokens(s.messages) for s in samples]
    examples = "\n\n".join(
        f"**{s.family}** ({', '.join(s.tickers)} as of {s.as_of})\n\n```\n{s.text_of('user')}\n```\n\n> {s.text_of('assistant')}"
        for s in {s.family: s for s in samples}.values()
    )
    return dg.MaterializeResult(metadata={
        "dagster/row_count": len(samples),
        "path": dg.MetadataValue.path(str(path)),
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
    samples = read_jsonl(samples_path(lake))
    manifest = json.loads(manifest_path(lake).read_text())
    result = validate_samples(samples, max_seq_len=manifest["config"]["max_seq_len"])
    report = datasets_dir(lake) / "validation" / "instruction_samples.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(result.raw, indent=1, default=str))
    for gate in result.gates.values():
        yield dg.AssetCheckResult(
            check_name=f"samples_{gate.name}",
            asset_key=instruction_samples.key,
            passed=gate.passed,
            description=gate.description,
            metadata={"failures": dg.MetadataValue.json(gate.failures), "report": dg.MetadataValue.path(str(report)),
                      "samples": len(samples)},
        )


class DatasetSplitConfig(dg.Config):
    val_fraction: float = Field(default=0.2, description="share of dated samples after the cutoff")
    cutoff: str = Field(default="", description="explicit ISO cutoff date (overrides val_fraction)")
    embargo_days: int = Field(default=0, description="calendar days before the cutoff excluded from train")


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
    cutoff = dt.date.fromisoformat(config.cutoff) if config.cutoff else None
    spec = SplitSpec(val_fraction=config.val_fraction, cutoff=cutoff, embargo_days=config.embargo_days)
    golden = golden_path(lake)
    holdout = read_jsonl(golden) if golden.exists() else []  # the frozen evaluation set never trains
    split = temporal_split(read_jsonl(samples_path(lake)), spec, holdout=holdout)
    out = split_dir(lake)
    train_path, val_path = out / "train.jsonl", out / "val.jsonl"
    write_jsonl(split.train, train_path)
    write_jsonl(split.val, val_path)
    (out / "split.json").write_text(json.dumps({"cutoff": split.cutoff.isoformat(), "train": len(split.train),
                                                "val": len(split.val), "dropped": split.dropped}, indent=2))
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
    out = split_dir(lake)
    train, val = read_jsonl(out / "train.jsonl"), read_jsonl(out / "val.jsonl")
    cutoff = json.loads((out / "split.json").read_text())["cutoff"]
    late_train = sum(1 for s in train if s.as_of and s.as_of > cutoff)
    early_val = sum(1 for s in val if not s.as_of or s.as_of <= cutoff)
    texts = lambda side: {s.text_of("user") for s in side} | {s.text_of("assistant") for s in side}  # noqa: E731
    shared = len(texts(train) & texts(val))
    return dg.AssetCheckResult(
        passed=late_train == early_val == shared == 0 and bool(train) and bool(val),
        metadata={"train_after_cutoff": late_train, "val_at_or_before_cutoff": early_val, "shared_texts": shared},
    )


dataset_checks = [instruction_samples_quality, split_has_no_leakage]
