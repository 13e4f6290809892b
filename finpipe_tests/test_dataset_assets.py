"""The lineage prices -> statistics -> samples (GE-gated) -> split, run for real through Dagster."""

import json

import pytest

from finpipe_tests.helpers import checks, derive, ingest


def test_lineage_to_the_split_on_the_offline_default(lake_resources, isolated_lake):
    resources = lake_resources()
    ingest(resources)
    result = derive(resources)
    assert result.success
    assert all(checks(result).values()) and set(checks(result)) == {
        "statistics_sane", "samples_schema_and_ranges", "samples_unique_ids", "samples_role_order",
        "samples_token_budget", "samples_no_nan_text", "samples_family_balance", "samples_fact_check",
        "samples_no_control_or_injection", "split_has_no_leakage"}
    meta = {k: v.value for k, v in result.asset_materializations_for_node("dataset_split")[0].metadata.items()}
    assert meta["train_samples"] > 2000 and meta["val_samples"] > 500
    cutoff = meta["cutoff"]
    val = [json.loads(line) for line in (isolated_lake / "datasets/split/val.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (isolated_lake / "datasets/split/train.jsonl").read_text().splitlines()]
    assert min(s["as_of"] for s in val) > cutoff >= max(s["as_of"] for s in train)
    assert (isolated_lake / "datasets/validation/instruction_samples.json").exists()
    stats_meta = result.asset_materializations_for_node("price_statistics")[0].metadata
    assert stats_meta["dagster/row_count"].value == 4 * 504  # NYSE sessions 2011-03-01..2013-03-01


def test_same_seed_same_bytes_through_dagster(lake_resources, tmp_path):
    from finpipe.defs.resources import LakeResource, MarketDataResource

    outputs = []
    for name in ("one", "two"):
        lake_dir = tmp_path / name
        resources = {"lake": LakeResource(lake_dir=str(lake_dir)), "market_data": MarketDataResource()}
        ingest(resources)
        assert derive(resources, samples_config={"seed": 11}).success
        outputs.append(((lake_dir / "datasets/split/train.jsonl").read_bytes(),
                        (lake_dir / "datasets/split/val.jsonl").read_bytes()))
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("corruption, failing_check", [
    ("wrong number", "samples_fact_check"),
    ("broken role order", "samples_role_order"),
    ("over-long", "samples_token_budget"),
])
def test_corrupt_external_sample_fails_its_check_and_blocks_the_split(lake_resources, isolated_lake, tmp_path,
                                                                      corruption, failing_check):
    resources = lake_resources()
    ingest(resources)
    assert derive(resources).success
    split_before = (isolated_lake / "datasets/split/train.jsonl").read_bytes()

    # one sample in finpipe's own chat format, as a user might merge from a curated file
    context = "Market data for AAPL (Apple Inc.) as of 2013-03-01:\n- close: 430.47\n\nQuestion: Where did AAPL close?"
    answer = "AAPL closed at 430.47 on 2013-03-01."
    messages = [{"role": "system", "content": "You are finpipe."}, {"role": "user", "content": context},
                {"role": "assistant", "content": answer}]
    if corruption == "wrong number":
        messages[2]["content"] = "AAPL closed at 431.47 on 2013-03-01."
    elif corruption == "broken role order":
        messages = [messages[0], messages[2], messages[1]]
    elif corruption == "over-long":
        messages[2]["content"] += " and so on" * 150
    record = {"messages": messages, "family": "price", "tickers": ["AAPL"], "as_of": "2013-03-01"}
    external = tmp_path / "curated.jsonl"
    external.write_text(json.dumps(record) + "\n")

    result = derive(resources, samples_config={"external_path": str(external)})
    assert not result.success
    evaluations = checks(result)
    assert [name for name, passed in evaluations.items() if not passed] == [failing_check]
    assert result.asset_materializations_for_node("dataset_split") == []  # blocked downstream
    assert (isolated_lake / "datasets/split/train.jsonl").read_bytes() == split_before  # last good split kept


def test_invalid_dataset_config_is_a_clear_error(lake_resources):
    resources = lake_resources()
    ingest(resources, "2013-02-01", "2013-03-01")
    result = derive(resources, samples_config={"families": ["price", "astrology"]})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "unknown families ['astrology']" in failure.event_specific_data.error.cause.message
