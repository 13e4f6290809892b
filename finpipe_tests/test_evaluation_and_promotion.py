"""Evaluation, report, promotion and the nightly automation: rules on hand-made numbers, then the real
lineage through Dagster with a tiny model (trained here, seconds)."""

import datetime as dt
import json
import math
from pathlib import Path

import dagster as dg
import pytest
import torch

from finpipe.evaluation.promotion import decide, golden_regressions


def scores(val_loss=1.0, golden_loss=1.0, fidelity=0.5, labels=0.5, rouge=0.5):
    overall = {"numeric_fidelity": fidelity, "label_accuracy": labels, "rouge_l": rouge}
    return {"val": {"loss": val_loss, "overall": overall}, "golden": {"loss": golden_loss, "overall": overall}}


# ----------------------------------------------------------------------------------------- promotion rule

def test_a_challenger_that_does_not_beat_the_base_is_never_promoted():
    d = decide(scores(val_loss=1.30), scores(val_loss=1.25), None, tolerance=0.05)
    assert not d.promote and not d.beats_base and "does not beat the base" in d.reason


def test_the_first_challenger_that_beats_the_base_becomes_champion():
    d = decide(scores(val_loss=1.10), scores(val_loss=1.25), None, tolerance=0.05)
    assert d.promote and "first champion" in d.reason


def test_promotion_refuses_a_worse_challenger_and_keeps_the_champion():
    base, champion = scores(val_loss=1.5), scores(val_loss=1.0, golden_loss=0.90)
    worse = decide(scores(val_loss=1.1, golden_loss=0.95), base, champion, tolerance=0.05)
    assert not worse.promote and "does not improve" in worse.reason
    better = decide(scores(val_loss=1.1, golden_loss=0.85), base, champion, tolerance=0.05)
    assert better.promote


def test_a_lower_loss_does_not_excuse_a_regression_beyond_the_tolerance():
    champion = scores(golden_loss=0.9, fidelity=0.80, labels=0.70)
    challenger = scores(golden_loss=0.5, fidelity=0.70, labels=0.68)  # fidelity -0.10 > 0.05; labels -0.02 ok
    d = decide(challenger, scores(val_loss=2.0), champion, tolerance=0.05)
    assert not d.promote and d.regressions == {"numeric_fidelity": {"champion": 0.80, "challenger": 0.70}}
    assert golden_regressions(challenger, champion, tolerance=0.15) == {}


def test_across_different_bases_answer_quality_decides_not_loss():
    champion = scores(golden_loss=0.1, fidelity=0.5, labels=0.5, rouge=0.5)  # other tokenizer: loss incomparable
    d = decide(scores(golden_loss=3.0, fidelity=0.6, labels=0.5, rouge=0.5), scores(val_loss=2.0), champion,
               tolerance=0.05, same_base=False)
    assert d.promote and "different bases" in d.reason


# --------------------------------------------------------------------------------- golden set and loss

def test_the_golden_set_is_frozen_once_and_held_out_of_later_splits(tmp_path):
    from finpipe.evaluation.golden import freeze_golden, golden_hash
    from finpipe.instructions.split import SplitSpec, temporal_split
    from finpipe_tests.test_instruction_datasets import default_samples

    first = temporal_split(default_samples(), SplitSpec(val_fraction=0.2))
    golden, created = freeze_golden(first.val, tmp_path / "golden.jsonl", per_family=2, seed=0)
    assert created and len(golden) == 14 and {s.family for s in golden} == {
        "price", "performance", "volatility", "trend", "momentum", "range", "comparison"}
    # a later night: different candidates, same golden set
    again, created_again = freeze_golden(first.train, tmp_path / "golden.jsonl", per_family=5, seed=1)
    assert not created_again and golden_hash(again) == golden_hash(golden)
    # a later split with an earlier cutoff would put golden samples in train: they are held out instead
    later = temporal_split(default_samples(), SplitSpec(val_fraction=0.05), holdout=golden)
    held = {s.text_of("user") for s in golden}
    assert not held & {s.text_of("user") for s in later.train + later.val}
    assert later.dropped["holdout"] == len(golden)


def test_assistant_loss_is_the_cross_entropy_of_the_answer_tokens_only(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finpipe.evaluation.evaluate import assistant_loss
    from finpipe_tests.test_instruction_datasets import default_samples

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_base), AutoTokenizer.from_pretrained(tiny_base)
    sample = default_samples()[0]
    prompt = tokenizer.apply_chat_template(sample.messages[:-1], add_generation_prompt=True, tokenize=True)
    full = tokenizer.apply_chat_template(sample.messages, tokenize=True)
    prompt, full = list(getattr(prompt, "input_ids", prompt)), list(getattr(full, "input_ids", full))
    ids = torch.tensor([full])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100  # by hand: only the answer (and its end-of-turn) is scored
    with torch.no_grad():
        expected = model(input_ids=ids, labels=labels).loss.item()
    assert assistant_loss(model, tokenizer, [sample]) == pytest.approx(expected, rel=1e-5)
    # batching with padding does not change a sample's contribution
    two = assistant_loss(model, tokenizer, [sample, default_samples()[1]], batch_size=2)
    assert two == pytest.approx(assistant_loss(model, tokenizer, [sample, default_samples()[1]], batch_size=1), rel=1e-5)


# --------------------------------------------------------------------- the lineage through Dagster


def materialize(assets, resources, ops=None):
    return dg.materialize(assets, resources=resources, raise_on_error=False, run_config={"ops": ops or {}})


EVAL = {"val_answers_per_family": 1, "golden_per_family": 1, "loss_samples": 14, "max_new_tokens": 12}
TRAIN = {"quantization": "none", "max_steps": 8, "eval_steps": 4, "max_val_samples": 8, "max_train_samples": 96,
         "batch_size": 4, "learning_rate": 5e-3, "max_seq_len": 512, "early_stopping_patience": 0}


def test_evaluate_report_promote_then_refuse_a_worse_challenger_and_survive_a_failed_evaluation(
        lake_resources, isolated_lake, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finpipe.defs.evaluation import (adapter_evaluation, champion_adapter, evaluation_checks,
                                         evaluation_report)
    from finpipe.defs.models import HuggingFaceResource, base_model, qlora_adapter
    from finpipe.market.lake import PriceLake
    from finpipe.models import registry
    from finpipe_tests.test_dataset_assets import derive, ingest

    resources = lake_resources() | {"huggingface": HuggingFaceResource()}
    ingest(resources)
    assert derive(resources).success
    lineage = [base_model, qlora_adapter, adapter_evaluation, evaluation_report, champion_adapter, *evaluation_checks]
    ops = {"base_model": {"config": {"model": str(tiny_base)}}, "qlora_adapter": {"config": TRAIN},
           "adapter_evaluation": {"config": EVAL}}
    first = materialize(lineage, resources, ops)
    assert first.success
    meta = lambda result, node: {k: v.value for k, v in result.asset_materializations_for_node(node)[0].metadata.items()}  # noqa: E731
    evaluation, promotion, report = (meta(first, n) for n in ("adapter_evaluation", "champion_adapter", "evaluation_report"))
    assert evaluation["adapter_val_loss"] < evaluation["base_val_loss"]  # a random tiny base learns fast
    assert promotion["promoted"] is True and promotion["champion"] == evaluation["run_id"]
    checks = {c.check_name: c.passed for c in first.get_asset_check_evaluations()}
    assert checks == {"adapter_beats_base_on_val_loss": True, "no_golden_regression_vs_champion": True}
    html = Path(report["html"]).read_text()
    assert "<th>base</th><th>adapter</th><th>champion</th>" in html and "data:image/png;base64," in html
    assert "validation numeric fidelity" in html and "promote: first champion" in html
    assert "Sample answers" in Path(report["markdown"]).read_text()
    golden = isolated_lake / "datasets/golden.jsonl"
    assert golden.exists() and len(golden.read_text().splitlines()) == 7

    champion_pointer = registry.champion_pointer(isolated_lake)
    champion_bytes = champion_pointer.read_bytes()
    champion = json.loads(champion_bytes)

    # a weaker challenger (2 small steps): evaluated, reported, refused; the champion stays
    worse_ops = ops | {"qlora_adapter": {"config": TRAIN | {"learning_rate": 1e-3, "max_steps": 2, "eval_steps": 1}}}
    second = materialize(lineage, resources, worse_ops)
    assert second.success
    refused = meta(second, "champion_adapter")
    assert refused["promoted"] is False and refused["champion"] == champion["run_id"]
    assert "does not improve on the champion" in refused["reason"] or "regresses" in refused["reason"]
    second_eval = json.loads((Path(meta(second, "adapter_evaluation")["path"])).read_text())
    assert second_eval["variants"]["champion"]["golden"]["loss"] < second_eval["variants"]["adapter"]["golden"]["loss"]
    assert "keep the champion" in Path(meta(second, "evaluation_report")["html"]).read_text()
    assert champion_pointer.read_bytes() == champion_bytes
    runs = registry.RunRegistry(PriceLake(isolated_lake / "finpipe.duckdb")).runs()
    assert dict(zip(runs["run_id"], runs["status"])) == {champion["run_id"]: "champion",
                                                         meta(second, "adapter_evaluation")["run_id"]: "rejected"}
    # the previous champion stays loadable with plain peft
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), champion["path"])

    # a failed evaluation (the newest adapter's weights are corrupt) leaves the champion untouched
    latest = json.loads(registry.latest_adapter_pointer(isolated_lake).read_text())
    (Path(latest["path"]) / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    third = materialize([adapter_evaluation, champion_adapter], resources, {"adapter_evaluation": {"config": EVAL}})
    assert not third.success
    assert not third.asset_materializations_for_node("champion_adapter")
    assert champion_pointer.read_bytes() == champion_bytes

    # the nightly run warm-starts from the champion: it starts where the champion ended, not from scratch
    nightly = materialize([qlora_adapter], resources, {"qlora_adapter": {"config": TRAIN | {"warm_start": "champion"}}})
    warm = meta(nightly, "qlora_adapter")
    assert warm["warm_start"] == champion["path"]
    fresh = meta(first, "qlora_adapter")
    assert warm["initial_val_loss"] < fresh["initial_val_loss"] - 0.1
    assert math.isclose(warm["initial_val_loss"], fresh["best_val_loss"], abs_tol=0.02)


# ----------------------------------------------------------------------------------- nightly automation

def test_the_nightly_schedule_runs_weekdays_after_the_us_close_over_the_documented_assets():
    from finpipe.defs.automation import NIGHTLY_ASSETS, nightly_retrain, nightly_schedule
    from finpipe.definitions import defs

    assert nightly_schedule.cron_schedule == "30 18 * * 1-5"
    assert nightly_schedule.execution_timezone == "America/New_York"
    assert nightly_schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    job = defs.resolve_job_def(nightly_retrain.name)
    keys = {k.to_user_string() for k in job.asset_layer.selected_asset_keys}
    assert keys == {"daily_prices", "price_statistics", "instruction_samples", "dataset_split", "base_model",
                    "qlora_adapter", "adapter_evaluation", "evaluation_report", "champion_adapter"}
    assert keys == {a.key.to_user_string() for a in NIGHTLY_ASSETS}
    assert "scratch_gpt" not in keys

    import zoneinfo

    when = dt.datetime(2026, 11, 25, 18, 30, tzinfo=zoneinfo.ZoneInfo("America/New_York"))  # 23:30 UTC
    request = nightly_schedule(dg.build_schedule_context(scheduled_execution_time=when))
    assert request.partition_key == "2026-11-25" and request.run_key == "nightly-2026-11-25"
    assert request.run_config["ops"]["qlora_adapter"]["config"]["warm_start"] == "champion"
    assert "2026-11-25" in job.partitions_def.get_partition_keys(dt.datetime(2026, 11, 26, 1, tzinfo=dt.timezone.utc))


def test_a_new_price_partition_makes_statistics_and_datasets_refresh(lake_resources):
    from finpipe.definitions import defs
    from finpipe.defs.market_data import daily_prices, market_data_checks

    instance = dg.DagsterInstance.ephemeral()
    resources = lake_resources()
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)

    dg.materialize([daily_prices, *market_data_checks], resources=resources, instance=instance,
                   partition_key="2013-03-01")
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    requested = {r.key.to_user_string() for r in result.results if r.true_subset.size}
    assert {"price_statistics", "instruction_samples", "dataset_split"} <= requested
    assert not requested & {"qlora_adapter", "adapter_evaluation", "champion_adapter"}  # no retraining per partition


def test_batched_greedy_answers_equal_one_by_one_answers(tiny_base):
    from finpipe.evaluation.generation import Sampling, generate, generate_batch, load_chat_model
    from finpipe_tests.test_instruction_datasets import default_samples

    model, tokenizer = load_chat_model(tiny_base)
    chats = [s.messages[:-1] for s in default_samples()[:5]]  # prompts of different lengths: left padding
    assert len({len(tokenizer.apply_chat_template(c, tokenize=False)) for c in chats}) > 1
    sampling, side = Sampling(max_new_tokens=10), tokenizer.padding_side
    one_by_one = [generate(model, tokenizer, c, sampling) for c in chats]
    batched = generate_batch(model, tokenizer, chats, sampling, batch_size=3)
    assert [g.text for g in batched] == [g.text for g in one_by_one]
    assert [g.new_tokens for g in batched] == [g.new_tokens for g in one_by_one]
    assert tokenizer.padding_side == side  # restored for training code that pads on the right


def test_serving_merges_the_adapter_and_answers_exactly_like_the_unmerged_model(tiny_base, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finpipe.evaluation.generation import Sampling, generate, load_chat_model
    from finpipe_tests.test_instruction_datasets import default_samples

    torch.manual_seed(1)
    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                             LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    unmerged, tokenizer = load_chat_model(tiny_base, tmp_path / "adapter")
    merged, _ = load_chat_model(tiny_base, tmp_path / "adapter", merge=True)
    assert not hasattr(merged, "disable_adapter")  # a plain transformers model: no LoRA layers left
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    chat = default_samples()[0].messages[:-1]
    sampling = Sampling(max_new_tokens=12)
    assert generate(merged, tokenizer, chat, sampling).text == generate(unmerged, tokenizer, chat, sampling).text
