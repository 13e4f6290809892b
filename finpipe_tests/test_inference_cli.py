"""The inference path of the command line: ask, chat, demo, export, runs - on a real lake and a tiny real model.

The lake is the offline replay ingested through Dagster (built once, copied into each test's own lake);
the model is a randomly initialised 2-layer Llama with finpipe's BPE tokenizer and a random LoRA adapter.
"""

import datetime as dt
import io
import re

import pytest
import torch

from finpipe.inference.context import LakeFacts, detect_families, detect_window, find_tickers, ground
from finpipe.instructions import rules
from finpipe.instructions.builder import DatasetSpec, build_samples
from finpipe.instructions.families import ALL_FAMILIES
from finpipe.market.lake import PriceLake
from finpipe.paths import LAKE_DB_NAME
from finpipe_tests.helpers import cli, lake_inputs


@pytest.fixture(autouse=True)
def _own_lake(lake: PriceLake) -> PriceLake:
    """Every test here runs on its own copy of the replay lake (``lake``, conftest)."""
    return lake


def latest_row(lake: PriceLake, ticker: str) -> dict:
    return lake.query("SELECT * FROM price_statistics WHERE ticker = ? ORDER BY date DESC LIMIT 1", [ticker]).row(
        0, named=True)


# --------------------------------------------------------------------------- context building


def test_question_naming_two_tickers_gets_their_latest_facts(lake):
    facts = LakeFacts(lake)
    assert facts.tickers() == ["AAPL", "GOOG", "IBM", "MSFT"]
    g = ground("How is AAPL doing vs msft?", facts)
    assert set(g.tickers) == {"AAPL", "MSFT"} and g.family == "comparison"
    latest = lake.query("SELECT max(date) AS d FROM price_statistics")["d"][0]
    assert latest == dt.date(2013, 3, 1) and g.as_of == "2013-03-01"
    assert g.context.startswith("Market data for AAPL and MSFT as of 2013-03-01:\n")
    for ticker in ("AAPL", "MSFT"):
        row = latest_row(lake, ticker)
        assert f"- {ticker} close: {rules.price(row['close'])}\n" in g.context + "\n"
        assert f"- {ticker} 30-day return: {rules.pct(row['ret_30d'])}" in g.context  # no window named: 30 days
    assert g.user.endswith("\n\nQuestion: How is AAPL doing vs msft?")
    assert [m["role"] for m in g.messages()] == ["system", "user"]

    one = ground("What is aapl's trend?", facts)
    row = latest_row(lake, "AAPL")
    assert one.tickers == ["AAPL"] and one.families == ("trend",)
    assert one.context.splitlines() == [
        "Market data for AAPL (Apple Inc.) as of 2013-03-01:",
        f"- close: {rules.price(row['close'])}",
        f"- close vs 20-day SMA: {rules.pct_abs(row['pct_vs_sma_20'])} {rules.side(row['pct_vs_sma_20'])}",
        f"- 20-day SMA: {rules.price(row['sma_20'])}",
        f"- close vs 50-day SMA: {rules.pct_abs(row['pct_vs_sma_50'])} {rules.side(row['pct_vs_sma_50'])}",
        f"- 50-day SMA: {rules.price(row['sma_50'])}",
        f"- trend: {rules.trend_label(row['close'], row['sma_20'], row['sma_50'])}",
        f"- 10-day SMA: {rules.price(row['sma_10'])}",
    ]
    trend = rules.trend_label(row["close"], row["sma_20"], row["sma_50"])
    assert re.search(rf"\b(trending {trend}|{trend} trend|trend is {trend})\b", one.reference), one.reference

    # no family named: the latest session (the trained layout of one family, a short prompt)
    general = ground("Tell me about IBM", facts)
    assert general.families == ("price",) and general.family == "price"
    # several families named: the union of their lines, each label once
    several = ground("Is IBM overbought, how volatile is it, and how far is it from its 52-week high?", facts)
    labels = [line.split(":")[0] for line in several.context.splitlines()[1:]]
    assert several.families == ("volatility", "momentum", "range") and several.family is None
    assert len(labels) == len(set(labels))
    assert {"- RSI (14)", "- 52-week high", "- annualized 20-day volatility"} <= set(labels)

    none = ground("What is a stock split?", facts)
    assert none.tickers == [] and none.context is None and none.user == "What is a stock split?"
    assert "no known ticker" in none.notes[0]


def test_every_training_question_gets_its_training_user_turn_back(lake):
    """The model sees exactly what it was trained on: a training question, asked at the newest date, is
    grounded into the very user turn of the training sample (all seven families, several phrasings)."""
    inputs, facts = lake_inputs(lake), LakeFacts(lake)
    seen = set()
    for seed in range(3):
        spec = DatasetSpec(seed=seed, date_stride=10_000, comparisons_per_date=6)  # only the newest date
        for sample in build_samples(*inputs, spec):
            question = sample.text_of("user").split("\n\nQuestion: ")[1]
            g = ground(question, facts)
            assert g.user == sample.text_of("user"), (sample.family, question)
            assert g.family == sample.family and g.reference is not None
            seen.add(sample.family)
    assert seen == set(ALL_FAMILIES)


def test_ticker_matching_is_whole_word_and_handles_index_and_exchange_symbols():
    known = ["AAPL", "MSFT", "A", "^NSEI", "^NSEBANK", "TCS.NS", "INFY.NS", "INFY.BO"]
    assert find_tickers("How is AAPL doing vs msft?", known) == ["AAPL", "MSFT"]
    assert find_tickers("$aapl, AAPL's and aapl again", known) == ["AAPL"]
    assert find_tickers("AAPLX and XAAPL and AAPL.NS and AAPL_1", known) == []
    assert find_tickers("is a good stock? what about A?", known) == ["A"]  # one letter: capitals only
    assert find_tickers("^NSEI vs nsebank, and tcs", known) == ["^NSEI", "^NSEBANK", "TCS.NS"]
    assert find_tickers("INFY is listed twice", known) == []  # ambiguous: INFY.NS or INFY.BO
    assert find_tickers("INFY.BO", known) == ["INFY.BO"]
    assert detect_families("Is MSFT overbought, and how volatile is it?") == ("volatility", "momentum")
    assert detect_window("over the last 14 trading days") == 14
    assert detect_window("the 10-day return") == 7 and detect_window("lately") == 30


# --------------------------------------------------------------------------- ask / chat / demo


def test_ask_answers_with_the_champion_and_with_the_base_model(capsys, champion, tiny, lake):
    code, out, err = cli(capsys, "ask", "What is AAPL's trend?", "--max-new-tokens", "5")
    assert code == 0, err
    assert out.strip() and "champion r1: " in err

    code, base_out, err = cli(capsys, "ask", "What is AAPL's trend?", "--max-new-tokens", "5", "--adapter", "none")
    assert code == 0, err
    assert base_out.strip() and "base tiny: " in err

    code, out, err = cli(capsys, "ask", "What is AAPL's trend?", "--max-new-tokens", "2", "--show-prompt")
    assert code == 0, err
    row = latest_row(lake, "AAPL")
    assert "<|im_start|>user\nMarket data for AAPL (Apple Inc.) as of 2013-03-01:" in out
    assert f"- 50-day SMA: {rules.price(row['sma_50'])}\n" in out and "--- answer ---" in out

    code, out, err = cli(capsys, "ask", "Is the market open?", "--max-new-tokens", "2")
    assert code == 2 and out == "" and "no ticker of the lake in the question" in err  # refused, no model called
    code, out, err = cli(capsys, "ask", "Is the market open?", "--max-new-tokens", "2", "--allow-ungrounded")
    assert code == 0 and "asking without market data" in err

    # the adapter really is applied: its logits differ from the base model's on the grounded prompt
    from finpipe.evaluation.generation import load_chat_model

    model, tokenizer = load_chat_model(tiny["base"], tiny["adapter"])
    prompt = tokenizer.apply_chat_template(ground("What is AAPL's trend?", LakeFacts(lake)).messages(),
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        adapted = model(**prompt).logits
        with model.disable_adapter():
            plain = model(**prompt).logits
    assert not torch.allclose(adapted, plain, atol=1e-3)


@pytest.mark.parametrize("option, value, named", [
    ("--top-p", "0", "top_p"), ("--temperature", "-1", "temperature"), ("--max-new-tokens", "0", "max_new_tokens"),
    ("--repetition-penalty", "0", "repetition_penalty"), ("--decode-weights", "fast", "decode_weights"),
])
def test_bad_sampling_value_is_a_one_line_error(capsys, champion, option, value, named):
    code, out, err = cli(capsys, "ask", "What is AAPL's trend?", option, value)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and named in err


def test_missing_models_tell_what_to_run(capsys, tiny):
    code, out, err = cli(capsys, "ask", "What is AAPL's trend?")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no champion adapter yet" in err and "finpipe run" in err
    code, _, err = cli(capsys, "ask", "What is AAPL's trend?", "--adapter", "none")
    assert code == 2 and "no base model yet" in err and "finpipe run" in err
    code, _, err = cli(capsys, "ask", "What is AAPL's trend?", "--adapter", str(tiny["base"]))
    assert code == 2 and "not a PEFT adapter folder" in err


def test_chat_answers_each_line_until_exit(capsys, monkeypatch, champion):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is AAPL's trend?\n\nIs MSFT overbought?\nexit\nnever asked\n"))
    code, out, err = cli(capsys, "chat", "--max-new-tokens", "4")
    assert code == 0, err
    assert err.count("[champion r1: ") == 2 and err.count("loading champion r1") == 1  # loaded once
    assert out.strip()

    monkeypatch.setattr("sys.stdin", io.StringIO("How volatile is IBM?"))  # EOF ends too, no newline needed
    code, out, err = cli(capsys, "chat", "--max-new-tokens", "2", "--show-prompt")
    assert code == 0 and err.count("[champion r1: ") == 1
    assert "Market data for IBM (International Business Machines) as of 2013-03-01:" in out


def test_demo_shows_base_and_adapter_side_by_side_with_the_reference(capsys, champion, lake):
    code, out, err = cli(capsys, "demo", "--max-new-tokens", "3")
    assert code == 0, err
    for i, family in enumerate(ALL_FAMILIES, 1):
        assert f"[{i}/7] {family}: " in out
    assert out.count("reference: ") == 7 and "reference: (no reference)" not in out
    assert out.count("base model") == 7 and out.count(" | champion r1") == 7
    row = latest_row(lake, "MSFT")  # the demo rotates tickers: trend is asked about the 4th (MSFT)
    assert "[4/7] trend: MSFT as of 2013-03-01" in out
    assert f"SMA of {rules.price(row['sma_20'])}" in out or f"SMA ({rules.price(row['sma_20'])})" in out

    code, _, err = cli(capsys, "demo", "--adapter", "none")
    assert code == 2 and "nothing to compare" in err


# --------------------------------------------------------------------------- export


def test_export_writes_a_plain_merged_model_with_the_adapters_logits(capsys, champion, tiny, lake, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = tmp_path / "exports" / "merged"
    code, out, err = cli(capsys, "export", "--merged", str(out_dir))
    assert code == 0, err
    assert f"exported: {out_dir}" in out
    assert (out_dir / "model.safetensors").exists() and (out_dir / "tokenizer_config.json").exists()
    assert not (out_dir / "adapter_config.json").exists()
    assert [p.name for p in out_dir.parent.iterdir()] == ["merged"]  # no temporary folder left behind

    merged = AutoModelForCausalLM.from_pretrained(out_dir)  # plain transformers, no PEFT
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["base"]), str(tiny["adapter"]))
    prompt = tokenizer.apply_chat_template(ground("Is MSFT overbought?", LakeFacts(lake)).messages(),
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        expected, got = peft_model(**prompt).logits, merged(**prompt).logits
        with peft_model.disable_adapter():
            plain = peft_model(**prompt).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert not torch.allclose(got, plain, atol=1e-3)

    code, _, err = cli(capsys, "export", "--merged", str(out_dir))
    assert code == 2 and "not empty" in err and "--force" in err
    code, _, err = cli(capsys, "export", "--merged", str(out_dir), "--force")
    assert code == 0, err
    assert [p.name for p in out_dir.parent.iterdir()] == ["merged"]

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    code, _, err = cli(capsys, "export", "--merged", str(precious), "--force")
    assert code == 2 and (precious / "notes.txt").read_text() == "keep me"
    code, _, err = cli(capsys, "export", "--merged", str(tiny["adapter"]), "--force")
    assert code == 2 and "holds the model being exported" in err


# --------------------------------------------------------------------------- runs


def test_runs_lists_the_registry(capsys, lake, isolated_lake):
    from finpipe.models.registry import RunRegistry

    code, out, _ = cli(capsys, "runs")
    assert code == 0 and out.strip().splitlines() == ["no runs yet: `finpipe run` trains and registers one"]
    assert "model_runs" not in lake.query("SELECT table_name FROM information_schema.tables")["table_name"].to_list()

    RunRegistry(lake).record({
        "run_id": "20250101-abc123", "created_at": dt.datetime(2025, 1, 1, 12, 0), "base_model": "tiny",
        "quantization": "nf4", "config_hash": "abc123", "adapter_path": str(isolated_lake / "a"),
        "val_loss": 1.234567, "golden_number_correctness": 0.875, "status": "champion",
    })
    code, out, _ = cli(capsys, "runs")
    assert code == 0
    assert "20250101-abc123" in out and "champion" in out and "1.2346" in out and "2025-01-01 12:00" in out
    assert "config_hash" not in out  # selected columns only


def test_runs_without_a_lake_creates_nothing(capsys, isolated_lake):
    (isolated_lake / LAKE_DB_NAME).unlink()
    code, out, _ = cli(capsys, "runs")
    assert code == 0 and len(out.strip().splitlines()) == 1 and "no runs yet" in out
    assert not (isolated_lake / LAKE_DB_NAME).exists()


def test_ask_merges_the_champion_once_rebuilds_it_when_the_adapter_changes_and_answers_alike(capsys, champion, tiny,
                                                                                              isolated_lake, tmp_path):
    """The merged weights are written once and loaded as a plain model; a stamp that does not match the adapter
    (another champion, changed weights, a tampered stamp) is never loaded: the folder is rebuilt."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from finpipe.evaluation.generation import Sampling, generate, load_chat_model
    from finpipe.inference.answering import prepare
    from finpipe.models import merged, registry

    question = "What is AAPL's trend?"
    code, first, err = cli(capsys, "ask", question, "--max-new-tokens", "8", "--decode-weights", "full")
    assert code == 0 and "merging adapter into" in err, err
    folder = merged.merged_root(isolated_lake) / "adapter"
    assert (folder / merged.STAMP).exists() and (folder / "model.safetensors").exists()
    code, again, err = cli(capsys, "ask", question, "--max-new-tokens", "8", "--decode-weights", "full")
    assert code == 0 and "merging" not in err and f"merged: {folder}" in err and again == first
    # the same text as merging in the process, as before
    model, tokenizer = load_chat_model(tiny["base"], tiny["adapter"], merge=True)
    prepared = prepare(question, LakeFacts(PriceLake(isolated_lake / LAKE_DB_NAME)))
    assert generate(model, tokenizer, prepared.messages, Sampling(max_new_tokens=8)).text == first.strip()

    # a tampered stamp: refused and rebuilt
    stamp = json.loads((folder / merged.STAMP).read_text())
    (folder / merged.STAMP).write_text(json.dumps(stamp | {"adapter_weights_sha256": "0" * 16}))
    code, _, err = cli(capsys, "ask", question, "--max-new-tokens", "2", "--decode-weights", "full")
    assert code == 0 and "merging adapter into" in err
    # a new champion (other weights): its own merged folder; the previous one is kept (one back)
    changed = tmp_path / "r2"
    shutil.copytree(tiny["adapter"], changed)
    weights = load_file(changed / "adapter_model.safetensors")
    save_file({k: v * 2 for k, v in weights.items()}, changed / "adapter_model.safetensors")
    registry.write_pointer(registry.champion_pointer(isolated_lake), champion | {"run_id": "r2", "path": str(changed)})
    code, other, err = cli(capsys, "ask", question, "--max-new-tokens", "8", "--decode-weights", "full")
    assert code == 0 and "merging r2 into" in err and (merged.merged_root(isolated_lake) / "r2").is_dir()
    assert (folder / merged.STAMP).exists()
    # a folder finpipe did not write is never replaced
    shutil.rmtree(merged.merged_root(isolated_lake) / "r2")
    (merged.merged_root(isolated_lake) / "r2").mkdir()
    (merged.merged_root(isolated_lake) / "r2" / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, "ask", question, "--max-new-tokens", "2")
    assert code == 2 and "was not written by finpipe" in err
    assert (merged.merged_root(isolated_lake) / "r2" / "notes.txt").read_text() == "mine"
