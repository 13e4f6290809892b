"""Grounded chat samples, their Great Expectations gates, and the leakage-free split."""

import copy
import datetime as dt
import json

import pytest

from finpipe.instructions import rules
from finpipe.instructions.external import ExternalDataError, load_external
from finpipe.instructions.factcheck import unsupported_numbers
from finpipe.instructions.families import ALL_FAMILIES
from finpipe.instructions.quality import validate_samples
from finpipe.instructions.samples import read_jsonl, write_jsonl
from finpipe.instructions.split import SplitSpec, load_as_dataset, temporal_split
from finpipe_tests.helpers import default_samples, samples


def failing_gates(result):
    return sorted(name for name, gate in result.gates.items() if not gate.passed)


def test_every_family_renders_grounded_samples_that_pass_every_gate():
    built = default_samples()
    assert {s.family for s in built} == set(ALL_FAMILIES)
    for s in built:
        assert [m["role"] for m in s.messages] == ["system", "user", "assistant"]
        assert f"as of {s.as_of}:" in s.text_of("user") and "\n\nQuestion: " in s.text_of("user")
        assert unsupported_numbers(s.text_of("assistant"), s.text_of("user")) == []
    result = validate_samples(built, max_seq_len=512)
    assert failing_gates(result) == []


def test_structured_fields_carry_the_numbers_and_labels_the_answer_states():
    by_family = {}
    for s in default_samples():
        by_family.setdefault(s.family, s)
    trend = by_family["trend"]
    e = trend.expected
    assert trend.labels["trend"] == rules.trend_label(e["close"], e["sma_20"], e["sma_50"])
    assert f"{e['close']:.2f}" in trend.text_of("assistant") and trend.labels["trend"] in trend.text_of("assistant")
    vol = by_family["volatility"]
    assert vol.labels["risk"] == rules.risk_label(vol.expected["volatility_20d_pct"] / 100)
    price = by_family["price"]
    assert f"{price.expected['close']:.2f}" in price.text_of("assistant")
    comparison = by_family["comparison"]
    assert len(comparison.tickers) == 2 and comparison.labels["outperformer"] in comparison.tickers + ["tie"]


def test_real_numbers_appear_in_context_aapl_2013_03_01():
    price = next(s for s in default_samples() if s.family == "price" and s.tickers == ["AAPL"] and s.as_of == "2013-03-01")
    # Quandl WIKI bar for AAPL on 2013-03-01
    assert "- close: 430.47" in price.text_of("user") and "- volume: 19,730,300" in price.text_of("user")
    assert price.expected["close"] == 430.47


@pytest.mark.parametrize("label, threshold_value, expected", [
    ("risk", 0.1999, "low"), ("risk", 0.20, "medium"), ("risk", 0.40, "high"),
    ("momentum", 70.0, "overbought"), ("momentum", 30.0, "oversold"), ("momentum", 50.0, "neutral"),
])
def test_label_rules_at_their_thresholds(label, threshold_value, expected):
    fn = {"risk": rules.risk_label, "momentum": rules.momentum_label}[label]
    assert fn(threshold_value) == expected


def test_trend_rule():
    assert rules.trend_label(110, 105, 100) == "up"
    assert rules.trend_label(90, 95, 100) == "down"
    assert rules.trend_label(101, 99, 100) == "sideways"


def test_fact_check_accepts_stated_and_derived_numbers_and_flags_the_rest():
    ctx = "Market data for A and B as of 2013-03-01:\n- A 5-day return: +1.23%\n- B 5-day return: -0.50%"
    assert unsupported_numbers("A outperformed B by 1.73 percentage points over 5 days; B fell 0.50%", ctx) == []
    assert unsupported_numbers("A rose 1.24% as of 2013-03-01", ctx) == ["1.24"]
    assert unsupported_numbers("as of 2013-03-04", ctx) == ["2013-03-04"]


def corrupted(kind: str):
    built = copy.deepcopy(default_samples()[-400:])  # the newest dates: every family present
    victim = next(s for s in built if s.family == "price")
    if kind == "wrong number":
        close = f"{victim.expected['close']:.2f}"
        victim.messages[2]["content"] = victim.messages[2]["content"].replace(close, f"{victim.expected['close'] + 1:.2f}")
    elif kind == "broken role order":
        victim.messages = [victim.messages[1], victim.messages[0], victim.messages[2]]
    elif kind == "over-long":
        victim.messages[2]["content"] += " and so on" * 120  # ~360 more tokens, still a sane length
    elif kind == "nan in text":
        victim.messages[2]["content"] += " The 1-day return was nan%."
    elif kind == "duplicate id":
        built.append(copy.deepcopy(victim))
    return built


@pytest.mark.parametrize("kind, gate", [
    ("wrong number", "fact_check"),
    ("broken role order", "role_order"),
    ("over-long", "token_budget"),
    ("nan in text", "no_nan_text"),
    ("duplicate id", "unique_ids"),
])
def test_a_corrupted_sample_fails_exactly_the_matching_gate(kind, gate):
    result = validate_samples(corrupted(kind), max_seq_len=512)
    assert failing_gates(result) == [gate]
    assert result.gates[gate].failures[0]["unexpected_count"] >= 1


def test_family_balance_gate_catches_a_lopsided_dataset():
    built = default_samples()
    lopsided = [s for s in built if s.family != "comparison"] + [s for s in built if s.family == "comparison"][:5]
    assert failing_gates(validate_samples(lopsided, max_seq_len=512)) == ["family_balance"]


def test_same_seed_gives_byte_identical_jsonl_and_another_seed_does_not(tmp_path):
    write_jsonl(samples(seed=7), tmp_path / "a.jsonl")
    write_jsonl(samples(seed=7), tmp_path / "b.jsonl")
    write_jsonl(samples(seed=8), tmp_path / "c.jsonl")
    a, b, c = ((tmp_path / f"{x}.jsonl").read_bytes() for x in "abc")
    assert a == b and a != c
    assert read_jsonl(tmp_path / "a.jsonl") == samples(seed=7)


def test_temporal_split_has_no_look_ahead_and_no_shared_text():
    built = default_samples()
    split = temporal_split(built + built[:50], SplitSpec(val_fraction=0.2))  # with 50 exact duplicates
    cutoff = split.cutoff.isoformat()
    assert all(s.as_of > cutoff for s in split.val)
    assert all(s.as_of <= cutoff for s in split.train)
    texts = lambda side: {s.text_of("user") for s in side} | {s.text_of("assistant") for s in side}  # noqa: E731
    assert not texts(split.train) & texts(split.val)
    assert split.dropped["duplicates"] == 50
    assert 0.15 < len(split.val) / (len(split.train) + len(split.val)) < 0.25


def test_split_embargo_and_explicit_cutoff():
    built = default_samples()
    split = temporal_split(built, SplitSpec(cutoff=dt.date(2012, 12, 31), embargo_days=30))
    assert max(s.as_of for s in split.train) <= "2012-12-01"
    assert min(s.as_of for s in split.val) > "2012-12-31"
    assert split.dropped["embargo"] > 0
    with pytest.raises(ValueError, match="validation split would be empty"):
        temporal_split(built, SplitSpec(cutoff=dt.date(2013, 3, 1)))
    with pytest.raises(ValueError, match="val_fraction must be in"):
        SplitSpec(val_fraction=1.5)


def test_split_file_loads_as_a_hugging_face_dataset(tmp_path):
    write_jsonl(default_samples()[:20], tmp_path / "train.jsonl")
    ds = load_as_dataset(tmp_path / "train.jsonl")
    assert len(ds) == 20
    assert ds[0]["messages"][0]["role"] == "system" and ds[0]["family"] == default_samples()[0].family


def test_external_alpaca_records_merge_from_jsonl_json_and_csv(tmp_path):
    records = [{"instruction": "What is a dividend?", "input": "", "output": "A payment to shareholders."},
               {"instruction": "Define beta.", "response": "Sensitivity of a stock to the market."}]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "x.json").write_text(json.dumps(records))
    (tmp_path / "x.csv").write_text("instruction,response\nWhat is a dividend?,A payment to shareholders.\n")
    for name, n in (("x.jsonl", 2), ("x.json", 2), ("x.csv", 1)):
        loaded = load_external(tmp_path / name)
        assert len(loaded) == n
        assert loaded[0].family == "external" and loaded[0].origin == f"external:{name}"
        assert [m["role"] for m in loaded[0].messages] == ["system", "user", "assistant"]
        assert loaded[0].text_of("assistant") == "A payment to shareholders."
    assert failing_gates(validate_samples(list(default_samples()) + load_external(tmp_path / "x.jsonl"), 512)) == []


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "x"}\n', "record 1 needs non-empty 'instruction' and 'response'"),
    ('{"instruction": "x", "response": "y"}\n{broken\n', "line 2 is not valid JSON"),
    ('{"messages": "hello"}\n', "'messages' must be a list"),
])
def test_malformed_external_files_are_specific_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ExternalDataError, match=message):
        load_external(path)
    with pytest.raises(ExternalDataError, match="unsupported file type"):
        load_external(tmp_path.joinpath("x.parquet").with_suffix(".parquet").touch() or tmp_path / "x.parquet")
