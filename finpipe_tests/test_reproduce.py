"""`finpipe reproduce`: a promoted run rebuilt from the lake as it was (identical data hashes, metrics within their
intervals, the weights compared), and a lake changed after the run named down to the first differing sample."""

import datetime as dt
import json

from finpipe_tests.helpers import cli

EVAL = {"golden_per_family": 2, "loss_samples": 14, "max_new_tokens": 1}
# a time budget, as the Quickstart's: its clock's decisions (steps, learning rates, evaluations) are replayed
TRAIN = {"quantization": "none", "max_minutes": 0.04, "max_steps": 0, "max_epochs": 50, "eval_points": 2, "max_val_samples": 8,
         "max_train_samples": 48, "batch_size": 4, "learning_rate": 5e-3, "max_seq_len": 512,
         "early_stopping_patience": 0, "curve_answers_per_family": 0}


def test_a_promoted_run_reproduces_and_a_changed_lake_names_the_first_differing_sample(
        lake_resources, isolated_lake, tiny_base, capsys):
    import dagster as dg

    from finpipe.definitions import in_groups
    from finpipe.defs.resources import HuggingFaceResource
    from finpipe.market.lake import PriceLake
    from finpipe.models import registry
    from finpipe.paths import LAKE_DB_NAME, DatasetFiles
    from finpipe.reproduce import EXIT_DATA_DIFFERS, INPUTS_FILE
    from finpipe_tests.helpers import derive, ingest

    resources = lake_resources() | {"huggingface": HuggingFaceResource()}
    ingest(resources)
    assert derive(resources).success
    ops = {"base_model": {"config": {"model": str(tiny_base)}}, "qlora_adapter": {"config": TRAIN},
           "adapter_evaluation": {"config": EVAL}}
    result = dg.materialize(in_groups("models", "evaluation"), resources=resources, raise_on_error=False,
                            run_config={"ops": ops})
    assert result.success
    champion = registry.read_pointer(registry.champion_pointer(isolated_lake))
    lake = PriceLake(isolated_lake / LAKE_DB_NAME)
    row = registry.RunRegistry(lake).get(champion["run_id"])
    split = json.loads(DatasetFiles.of(isolated_lake).split_manifest.read_text())
    assert row["train_sha256"] == split["files"]["train"]["sha256"] and row["val_sha256"] == split["files"]["val"]["sha256"]
    assert row["prices_through"] == dt.date(2013, 3, 1) and len(row["base_model_sha256"]) == 64 and row["code_version"]
    assert json.loads(row["adapter_spec_json"])["spec"]["seed"] == 42
    assert (registry.adapters_dir(isolated_lake) / champion["run_id"] / "evaluation" / INPUTS_FILE).exists()

    # a newer price row (a later ingest) is left out: the dataset builder sees the lake as it was
    with lake.connect() as con:
        con.execute("INSERT INTO prices SELECT ticker, date + 3, open, high, low, close, adj_close, volume, source, "
                    "simulated, now() FROM prices WHERE date = DATE '2013-03-01' LIMIT 1")
    recorded_adapter = sorted(p.name for p in (registry.adapters_dir(isolated_lake) / champion["run_id"]).rglob("*"))
    code, out, _ = cli(capsys, "reproduce", "champion")
    assert code == 0, out
    assert "train identical" in out and "val   identical" in out and "1 newer rows left out" in out
    assert out.rstrip().splitlines()[-1].startswith("identical data, metrics within interval (")
    # same seed, same data, same CPU and torch build, same process, the clock's schedule replayed: bit-identical
    report = json.loads((registry.adapters_dir(isolated_lake) / champion["run_id"] / "training_report.json").read_text())
    assert report["stopped_by"] == "time" and len(report["lr_factors"]) >= report["steps"] > 0
    assert "are replayed" in out and "weights: bit-identical" in out, out
    assert "number_correctness: reproduced" in out
    # it touched nothing of the run's and left no scratch folder behind
    assert sorted(p.name for p in (registry.adapters_dir(isolated_lake) / champion["run_id"]).rglob("*")) == recorded_adapter
    assert not any((registry.models_dir(isolated_lake) / "reproductions").iterdir())

    # a price row of the first training sample's date is corrected after the run
    first = json.loads(DatasetFiles.of(isolated_lake).train.read_text().splitlines()[0])
    ticker, day = first["tickers"][0], first["as_of"]
    with lake.connect() as con:
        con.execute("UPDATE prices SET open = open * 1.1, high = high * 1.1, low = low * 1.1, close = close * 1.1, "
                    "adj_close = adj_close * 1.1, ingested_at = now() WHERE ticker = ? AND date = ?", [ticker, day])
    code, out, _ = cli(capsys, "reproduce", champion["run_id"], "--skip-training")
    assert code == EXIT_DATA_DIFFERS, out
    assert "train DIFFERS" in out
    assert f"first differing sample: train #0 {first['id']} {first['family']}" in out, out
    # matched by what it is about (family, ticker, date), not by its position: the fields that differ are named
    assert f"{first['family']} {ticker} as of {day}, fields: messages, expected, facts\n" in out, out
    assert f"price row(s) up to 2013-03-01 were written after the run (first: {ticker} {day}" in out, out
    code, out, _ = cli(capsys, "reproduce", champion["run_id"], "--skip-training", "--json")
    as_json = json.loads(out)
    assert code == EXIT_DATA_DIFFERS and as_json["exit_code"] == EXIT_DATA_DIFFERS and as_json["verdict"]
    code, out, err = cli(capsys, "reproduce", "no-such-run")
    assert code == 2 and "no run 'no-such-run'" in err


def test_the_first_differing_sample_is_matched_by_what_it_is_about_not_by_position():
    from finpipe.reproduce import _first_changed

    def item(family, ticker, day, text="a"):
        return {"id": f"{family}{ticker}{day}{text}", "family": family, "tickers": [ticker], "as_of": day,
                "fields": {"messages": text, "expected": "e"}}

    recorded = [item("price", "AAPL", "2011-03-03"), item("price", "GOOG", "2011-03-03"), item("rsi", "AAPL", "2011-03-04")]
    # the same samples in another order (a changed text changes a sample's id, which orders a date's samples)
    assert _first_changed(recorded, [recorded[1], recorded[0], recorded[2]]) is None
    changed = _first_changed(recorded, [recorded[1], item("price", "AAPL", "2011-03-03", "b"), recorded[2]])
    assert changed["index"] == 0 and changed["fields"] == ["messages"] and changed["rebuilt_index"] == 1
    assert _first_changed(recorded, recorded[:2])["note"] == "missing from the rebuild"
    new = _first_changed(recorded, [*recorded, item("rsi", "GOOG", "2011-03-04")])
    assert new["note"] == "new in the rebuild" and new["index"] == 3


def test_a_run_recorded_without_what_reproducing_needs_is_refused_with_the_reason(champion, isolated_lake):
    import pytest

    from finpipe.market.lake import PriceLake
    from finpipe.models.registry import RunRegistry
    from finpipe.paths import LAKE_DB_NAME
    from finpipe.reproduce import CannotReproduce, reproduce

    RunRegistry(PriceLake(isolated_lake / LAKE_DB_NAME)).record({
        "run_id": "r1", "created_at": dt.datetime(2026, 1, 1), "base_model": "tiny", "quantization": "none",
        "config_hash": "x", "adapter_path": champion["path"]})
    with pytest.raises(CannotReproduce, match="r1 was recorded without train_sha256, val_sha256, prices_through"):
        reproduce(isolated_lake, "champion")
    assert not (isolated_lake / "models" / "reproductions").exists()
