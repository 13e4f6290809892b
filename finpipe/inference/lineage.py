"""Where an adapter came from, gathered from the lake: what a model card and a served answer's provenance state."""

from __future__ import annotations

from pathlib import Path

from finpipe.models.files import read_json_or_empty


def passed_gates(validation: dict) -> list[str]:
    """The dataset gates whose expectations all passed, from the saved Great Expectations result."""
    from finpipe.instructions.quality import GATES

    failed = {r.get("expectation_config", {}).get("meta", {}).get("gate") for r in validation.get("results", [])
              if not r.get("success")}
    return [g for g in GATES if g not in failed] if validation else []


def adapter_lineage(lake_dir: Path, pointer: dict) -> dict:
    """Run id, base, training report, evaluation record, data window and sources, gates, the registry's status and
    reason, for an adapter pointer (``{run_id, path, base}``, as in champion.json)."""
    from finpipe.inference.export import portable
    from finpipe.market.lake import PriceLake
    from finpipe.models.registry import RunRegistry
    from finpipe.paths import LAKE_DB_NAME, DatasetFiles

    adapter = Path(pointer["path"])
    datasets = DatasetFiles.of(lake_dir)
    # base_path as a model card may publish it: relative to the lake, or the folder's name (never this machine's)
    out = {"run_id": pointer["run_id"], "base_name": pointer["base"]["name"],
           "base_path": portable(pointer["base"]["path"], lake_dir),
           "training": read_json_or_empty(adapter / "training_report.json"),
           "evaluation": read_json_or_empty(adapter / "evaluation" / "evaluation.json"),
           "gates": passed_gates(read_json_or_empty(datasets.gate_report)),
           "val_cutoff": read_json_or_empty(datasets.split_manifest).get("cutoff")}  # until the registry's row says
    db = lake_dir / LAKE_DB_NAME
    if db.exists():
        lake = PriceLake(db)
        sources = lake.query("SELECT DISTINCT source FROM prices ORDER BY source")["source"].to_list()
        out["data_sources"] = ", ".join(sources)
        tables = lake.query("SELECT table_name FROM information_schema.tables")["table_name"].to_list()
        if "model_runs" in tables:
            row = RunRegistry(lake).get(pointer["run_id"]) or {}
            out |= {k: str(row[k]) if row.get(k) is not None else None for k in ("train_first", "train_last")}
            if row.get("val_cutoff") is not None:  # the adapter's own split, not the lake's current one
                out["val_cutoff"] = str(row["val_cutoff"])
            # the registry's verdict: a model card of a run promotion refused says so
            out |= {k: row.get(k) for k in ("status", "reason")}
    return out
