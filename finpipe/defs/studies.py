"""Studies as assets: the PEFT method comparison (one partition per method) and the compression study of
the champion, with results in lake tables (``peft_study``, ``compression_study``) and reports."""

import datetime as dt
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field

from finpipe.defs.config import config_class
from finpipe.defs.datasets import dataset_split, split_and_golden
from finpipe.defs.evaluation import champion_adapter
from finpipe.defs.metadata import markdown_table, markdown_with_inline_images
from finpipe.defs.models import base_model
from finpipe.defs.resources import LAKE_WRITER_POOL, LAKE_WRITER_TAGS, LakeResource
from finpipe.evaluation.evaluate import EvalSpec
from finpipe.models import registry
from finpipe.settings import fields_of, help_of
from finpipe.studies.compression import CompressionSpec
from finpipe.studies.peft_study import STUDY_METHODS, PeftStudySpec

PEFT_TABLE, COMPRESSION_TABLE = "peft_study", "compression_study"
peft_methods = dg.StaticPartitionsDefinition(list(STUDY_METHODS))


def studies_dir(lake: LakeResource) -> Path:
    return lake.directory / "studies"


PeftStudyConfig = config_class(PeftStudySpec, "PeftStudyConfig",
                               doc="The UI/run-config face of ``PeftStudySpec``: the budget every method gets.")


@dg.asset(
    partitions_def=peft_methods,
    deps=[base_model, dataset_split],
    group_name="studies",
    pool=LAKE_WRITER_POOL,  # upserts its row in peft_study
    op_tags=LAKE_WRITER_TAGS,
    kinds={"pytorch", "duckdb"},
    description="One PEFT method (the partition) trained on the training split with the study's shared budget, "
    "scored on the golden set; its row in the lake table peft_study. Backfill all partitions to compare.",
)
def peft_method_run(context: dg.AssetExecutionContext, config: PeftStudyConfig,
                    lake: LakeResource) -> dg.MaterializeResult:
    from finpipe.evaluation.golden import golden_hash
    from finpipe.studies.peft_study import run_method
    from finpipe.studies.results import upsert_rows

    method = context.partition_key
    study = PeftStudySpec(**config.model_dump())
    base = registry.read_pointer(registry.base_pointer(lake.directory))
    train, val, golden, _ = split_and_golden(lake, EvalSpec.golden_per_family, EvalSpec.seed)
    row = run_method(method, base["path"], train, val, golden, studies_dir(lake) / "peft" / method, study,
                     log=context.log.info)
    row |= {"base_model": base["name"], "golden_hash": golden_hash(golden),
            "finished_at": dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)}
    upsert_rows(lake.prices_lake(), PEFT_TABLE, [row], key="method")
    shown = {k: v for k, v in row.items() if k not in ("spec", "finished_at")}
    return dg.MaterializeResult(metadata={
        **{k: v for k, v in shown.items() if isinstance(v, (int, float, str)) and v is not None},
        "adapter_path": dg.MetadataValue.path(row["adapter_path"]),
    })


@dg.asset(
    deps=[peft_method_run],
    group_name="studies",
    kinds={"html"},
    description="The PEFT comparison: table of every method in peft_study (peak memory, time, adapter size, "
    "quality) and plots of quality vs adapter size and vs training time, with the Pareto frontier.",
)
def peft_comparison(lake: LakeResource) -> dg.MaterializeResult:
    from finpipe.studies.report import pareto_plots, render_study

    frame = lake.prices_lake().query(f"SELECT * FROM {PEFT_TABLE} ORDER BY method")
    if frame.height == 0:
        raise dg.Failure("peft_study is empty: materialize (backfill) peft_method_run partitions first")
    columns = ["method", "trainable_params", "adapter_mb", "train_seconds", "peak_rss_delta_mb", "best_val_loss",
               "golden_loss", "golden_number_correctness", "golden_label_correctness", "golden_exact_match",
               "golden_rouge_l", "quality", "latency_s"]
    out = studies_dir(lake) / "peft"
    rows = frame.to_dicts()
    plots, fronts = pareto_plots(rows, "method", [("adapter_mb", "adapter size (MB)"),
                                                  ("train_seconds", "training time (s)")], out)
    summary = [("methods", ", ".join(frame["method"].to_list())),
               ("budget", f"{frame['steps'].max()} steps each on {frame['base_model'][0]}, same split and golden set"),
               ("quality", "mean of the strict golden metrics: number correctness, label correctness, exact match"),
               *[(f"Pareto frontier, quality vs {c}", ", ".join(f)) for c, f in fronts.items()]]
    md, html = render_study("finpipe PEFT method comparison", rows, columns, out, summary, plots)
    return dg.MaterializeResult(metadata={
        "methods": frame.height,
        "table": dg.MetadataValue.md(markdown_table(frame.select(columns))),
        "html": dg.MetadataValue.path(str(html)),
        "report": dg.MetadataValue.md(markdown_with_inline_images(md.read_text(), plots)),
    })


CompressionConfig = config_class(
    CompressionSpec, "CompressionConfig", only=[n for n, *_ in fields_of(CompressionSpec) if n != "ks"],
    extra={"ks": (list[int], Field(default=list(CompressionSpec.ks), description=help_of(CompressionSpec, "ks")))},
    doc="What to compress and how hard (the UI face of ``CompressionSpec``).")


@dg.asset(
    deps=[champion_adapter],
    group_name="studies",
    pool=LAKE_WRITER_POOL,  # upserts its rows in compression_study
    op_tags=LAKE_WRITER_TAGS,
    kinds={"pytorch", "duckdb", "html"},
    description="Compression of the champion (merged into its base): post-training quantization (bf16, "
    "8-bit, 4-bit NF4) and successive layer dropping with optional LoRA healing; size, parameters, "
    "tokens/s, peak memory and quality per variant in the lake table compression_study, with the Pareto "
    "frontiers (size vs quality, speed vs quality).",
)
def compression_study(context: dg.AssetExecutionContext, config: CompressionConfig,
                      lake: LakeResource) -> dg.MaterializeResult:
    from finpipe.inference.export import export_merged
    from finpipe.studies.compression import UNSUPPORTED_METHODS, CompressionSpec, run_compression_study
    from finpipe.studies.report import render_study
    from finpipe.studies.results import upsert_rows

    spec = CompressionSpec(**(config.model_dump() | {"ks": tuple(config.ks)}))
    champion = registry.read_pointer(registry.champion_pointer(lake.directory))
    out = studies_dir(lake) / "compression"
    merged = out / "merged"
    if not (merged / "config.json").exists() or _merged_from(merged) != champion["run_id"]:
        context.log.info(f"merging the champion {champion['run_id']} into its base")
        export_merged(champion["base"]["path"], champion["path"], merged, force=True,
                      provenance={"champion": champion["run_id"]})
    train, val, golden, _ = split_and_golden(lake, EvalSpec.golden_per_family, EvalSpec.seed)
    rows = run_compression_study(merged, train, val, golden, out, spec, log=context.log.info)
    finished = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    rows = [r | {"champion": champion["run_id"], "finished_at": finished} for r in rows]
    upsert_rows(lake.prices_lake(), COMPRESSION_TABLE, rows, key="variant")
    columns = ["variant", "size_mb", "size_basis", "parameters", "layers", "tokens_per_s", "latency_s",
               "peak_rss_increase_mb", "loss", "number_correctness", "label_correctness", "exact_match", "quality",
               "pareto_size", "pareto_speed", "skipped"]
    plots = {"quality vs size": out / "pareto_size.png", "quality vs generation speed": out / "pareto_speed.png"}
    summary = [("champion", champion["run_id"]), ("variants", ", ".join(r["variant"] for r in rows)),
               ("Pareto frontier, quality vs size", ", ".join(r["variant"] for r in rows if r["pareto_size"])),
               ("Pareto frontier, quality vs speed", ", ".join(r["variant"] for r in rows if r["pareto_speed"])),
               ("not studied", "; ".join(f"{k}: {v}" for k, v in UNSUPPORTED_METHODS.items()))]
    md, html = render_study("finpipe compression study", rows, columns, out, summary, plots)
    table = pl.DataFrame([{c: r.get(c) for c in columns} for r in rows], infer_schema_length=None)
    return dg.MaterializeResult(metadata={
        "variants": len(rows),
        "table": dg.MetadataValue.md(markdown_table(table, max_rows=40)),
        "html": dg.MetadataValue.path(str(html)),
        "report": dg.MetadataValue.md(markdown_with_inline_images(md.read_text(), plots)),
    })


def _merged_from(folder: Path) -> str | None:
    """The champion run a merged folder was exported from (its export manifest says)."""
    import json

    from finpipe.inference.export import EXPORT_MANIFEST

    manifest = folder / EXPORT_MANIFEST
    return json.loads(manifest.read_text()).get("champion") if manifest.exists() else None
