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


def scores(val_loss=1.0, golden_loss=1.0, numbers=0.5, labels=0.5, exact=0.5, probe=None):
    overall = {"number_correctness": numbers, "label_correctness": labels, "exact_match": exact}
    out = {"val": {"loss": val_loss, "overall": overall}, "golden": {"loss": golden_loss, "overall": overall}}
    if probe is not None:  # probe: the forgetting probe's answers, right or wrong
        out["forgetting"] = {"score": sum(probe) / len(probe), "rows": [{"right": r} for r in probe]}
    return out


# ----------------------------------------------------------------------------------------- promotion rule

def test_a_challenger_that_does_not_beat_the_base_is_never_promoted():
    d = decide(scores(val_loss=1.30), scores(val_loss=1.25), None, tolerance=0.05)
    assert not d.promote and not d.beats_base and "does not beat the base" in d.reason


def test_the_first_challenger_that_beats_the_base_becomes_champion():
    d = decide(scores(val_loss=1.10), scores(val_loss=1.25), None, tolerance=0.05)
    assert d.promote and "first champion" in d.reason


def test_promotion_decides_on_strict_golden_quality_not_loss():
    base, champion = scores(val_loss=1.5), scores(val_loss=1.0, golden_loss=0.90, numbers=0.8, labels=0.6, exact=0.5)
    # a lower loss with the same strict scores is only a tie-break ...
    tie = decide(scores(val_loss=1.1, golden_loss=0.85, numbers=0.8, labels=0.6, exact=0.5), base, champion, 0.05)
    assert tie.promote and "equal" in tie.reason
    # ... and never outweighs worse answers
    worse = decide(scores(val_loss=1.1, golden_loss=0.10, numbers=0.8, labels=0.58, exact=0.5), base, champion, 0.05)
    assert not worse.promote and "does not improve" in worse.reason
    better = decide(scores(val_loss=1.1, golden_loss=0.95, numbers=0.85, labels=0.6, exact=0.5), base, champion, 0.05)
    assert better.promote and "strict quality" in better.reason


def test_a_better_mean_does_not_excuse_a_strict_regression_beyond_the_tolerance():
    champion = scores(numbers=0.80, labels=0.70, exact=0.30)
    challenger = scores(numbers=0.70, labels=0.95, exact=0.60)  # numbers -0.10 > 0.05, though the mean is higher
    d = decide(challenger, scores(val_loss=2.0), champion, tolerance=0.05)
    assert not d.promote and d.regressions == {"number_correctness": {"champion": 0.80, "challenger": 0.70}}
    assert golden_regressions(challenger, champion, tolerance=0.15) == {}


def test_a_challenger_worse_on_the_wild_questions_is_not_promoted():
    def wild(numbers, labels, relevance):
        means = {"number_correctness": numbers, "label_correctness": labels, "relevance": relevance}
        return {"summary": {"parts": {"wild": {"n": 70, "means": means}}}}

    champion = scores(numbers=0.80, labels=0.70, exact=0.30) | {"end_to_end": wild(0.95, 0.90, 1.0)}
    better_golden = scores(numbers=0.90, labels=0.80, exact=0.40)
    d = decide(better_golden | {"end_to_end": wild(0.95, 0.80, 1.0)}, scores(val_loss=2.0), champion, tolerance=0.05)
    assert not d.promote and d.regressions == {"wild label_correctness": {"champion": 0.90, "challenger": 0.80}}
    assert decide(better_golden | {"end_to_end": wild(0.94, 0.88, 0.98)}, scores(val_loss=2.0), champion, 0.05).promote
    # a champion evaluated before the wild part existed: the golden rule alone decides
    assert decide(better_golden | {"end_to_end": wild(0.1, 0.1, 0.1)}, scores(val_loss=2.0),
                  scores(numbers=0.80, labels=0.70, exact=0.30), 0.05).promote


def test_promotion_refuses_an_adapter_that_clearly_forgot_general_skills():
    base = scores(val_loss=2.0, probe=[True] * 20 + [False] * 3)
    forgot = decide(scores(val_loss=1.0, probe=[True] * 8 + [False] * 15), base, None, tolerance=0.05)
    assert not forgot.promote and "forgets general skills" in forgot.reason and forgot.forgetting["forgot"]
    # one question fewer is within the tolerance and not significant: promoted
    kept = decide(scores(val_loss=1.0, probe=[True] * 19 + [False] * 4), base, None, tolerance=0.05)
    assert kept.promote and not kept.forgetting["forgot"]


# --------------------------------------------------------------------------------- golden set and loss

def test_the_golden_set_is_frozen_once_balanced_across_labels_and_held_out_of_later_splits(tmp_path):
    from collections import Counter

    from finpipe.evaluation.golden import PARAPHRASE_ORIGIN, freeze_golden, golden_hash, part_of
    from finpipe.evaluation.paraphrases import HELD_OUT_QUESTIONS
    from finpipe.instructions.balance import label_stratum
    from finpipe.instructions.families import QUESTIONS
    from finpipe.instructions.split import SplitSpec, temporal_split
    from finpipe_tests.helpers import default_samples

    first = temporal_split(default_samples(), SplitSpec(val_fraction=0.2))
    golden, created = freeze_golden(first.val, tmp_path / "golden.jsonl", per_family=10, seed=0)
    assert created and len(golden) == 70
    assert Counter(s.family for s in golden) == {f: 10 for f in QUESTIONS}
    assert Counter(part_of(s) for s in golden) == {"seen": 35, "paraphrase": 35}
    # balanced: risk cycles low / medium / high (the split's validation side has all three)
    risk = Counter(label_stratum(s) for s in golden if s.family == "volatility")
    assert len(risk) == 3 and max(risk.values()) - min(risk.values()) <= 1
    # a paraphrased question uses a held-out wording, keeps the context, the facts and the answer
    para = next(s for s in golden if s.origin == PARAPHRASE_ORIGIN)
    question = para.text_of("user").rsplit("Question: ", 1)[1]
    assert question in {q.format(**para.facts) for q in HELD_OUT_QUESTIONS[para.family]}
    source = next(s for s in first.val if s.text_of("assistant") == para.text_of("assistant"))
    assert para.facts == source.facts and para.text_of("user").split("Question:")[0] == \
        source.text_of("user").split("Question:")[0]
    # a later night: different candidates, same golden set
    again, created_again = freeze_golden(first.train, tmp_path / "golden.jsonl", per_family=5, seed=1)
    assert not created_again and golden_hash(again) == golden_hash(golden)
    # a later split with an earlier cutoff would put golden samples in train: they are held out instead
    later = temporal_split(default_samples(), SplitSpec(val_fraction=0.05), holdout=golden)
    held = {s.text_of("assistant") for s in golden}
    assert not held & {s.text_of("assistant") for s in later.train + later.val}


def test_held_out_wordings_never_appear_in_training_data():
    import ast
    import inspect

    from finpipe.evaluation.paraphrases import HELD_OUT_QUESTIONS
    from finpipe.instructions import builder, families
    from finpipe_tests.helpers import default_samples

    training_questions = {s.text_of("user").rsplit("Question: ", 1)[1] for s in default_samples()}
    for family, wordings in HELD_OUT_QUESTIONS.items():
        assert len(wordings) >= 4 and not set(wordings) & set(families.QUESTIONS[family])
        stems = {w.split("{")[0] for w in wordings}
        assert not any(q.startswith(stem) for q in training_questions for stem in stems if len(stem) > 8)
    for module in (builder, families):  # the dataset builder never imports the held-out list
        imported = {n.module for n in ast.walk(ast.parse(inspect.getsource(module))) if isinstance(n, ast.ImportFrom)}
        assert "finpipe.evaluation.paraphrases" not in imported


def test_a_golden_set_of_an_older_version_is_set_aside_and_refrozen(tmp_path):
    from finpipe.evaluation.golden import GOLDEN_VERSION, freeze_golden
    from finpipe.instructions.samples import write_jsonl
    from finpipe.instructions.split import SplitSpec, temporal_split
    from finpipe_tests.helpers import default_samples

    val = temporal_split(default_samples(), SplitSpec(val_fraction=0.2)).val
    old = tmp_path / "golden.jsonl"
    write_jsonl(val[:14], old)
    old.with_suffix(".manifest.json").write_text(json.dumps({"hash": "x", "samples": 14}))  # no version: v1
    golden, created = freeze_golden(val, old, per_family=10, seed=0)
    assert created and len(golden) == 70
    assert (tmp_path / "golden.v1.jsonl").exists() and (tmp_path / "golden.v1.manifest.json").exists()
    assert json.loads(old.with_suffix(".manifest.json").read_text())["version"] == GOLDEN_VERSION


def test_label_balancing_makes_each_label_value_equally_frequent_and_keeps_family_sizes():
    from collections import Counter

    from finpipe.instructions.balance import balance_by_label, strata_counts
    from finpipe_tests.helpers import default_samples

    samples = default_samples()
    before = strata_counts(samples)
    assert before["momentum"]["momentum=neutral"] > 5 * before["momentum"].get("momentum=oversold", 1)
    balanced = balance_by_label(samples, seed=0, max_repeat=100)
    after = strata_counts(balanced)
    for family, strata in after.items():
        share = sum(before[family].values()) // len(strata)
        # each label value as often as the others, unless it is too rare to repeat that often (a tie: 1 sample)
        assert strata == {k: min(share, n * 100) for k, n in before[family].items()}, (family, strata)
    capped = strata_counts(balance_by_label(samples, seed=0, max_repeat=2))
    assert capped["momentum"]["momentum=oversold"] <= 2 * before["momentum"]["momentum=oversold"]
    assert balance_by_label(samples, seed=0) == balance_by_label(samples, seed=0)  # seeded
    assert Counter(s.family for s in balanced).keys() == Counter(s.family for s in samples).keys()


def test_bootstrap_intervals_cover_the_mean_and_shrink_with_more_samples():
    from finpipe.evaluation.stats import bootstrap_ci, paired_difference_ci

    few, many = [1, 0, 1, 1, 0] * 2, [1, 0, 1, 1, 0] * 40
    lo, hi = bootstrap_ci(few)
    assert lo < 0.6 < hi
    lo2, hi2 = bootstrap_ci(many)
    assert lo2 < 0.6 < hi2 and (hi2 - lo2) < (hi - lo) / 3
    assert bootstrap_ci([]) is None and bootstrap_ci([0.5]) == (0.5, 0.5)
    assert bootstrap_ci(few, seed=3) == bootstrap_ci(few, seed=3)
    diff, dlo, dhi = paired_difference_ci([1] * 30, [0] * 25 + [1] * 5)
    assert diff == pytest.approx(25 / 30, abs=1e-4) and dlo > 0  # clearly better
    same = paired_difference_ci([1, 0] * 10, [0, 1] * 10)
    assert same[1] < 0 < same[2]  # not established


def test_the_forgetting_probe_scores_whole_words():
    from finpipe.evaluation.forgetting import PROBE, is_right, score_probe

    assert is_right("The capital of France is Paris.", "Paris")
    assert not is_right("Parisian food", "Paris") and not is_right("7 + 5 = 125", "12")
    assert is_right("The boiling point is 100.0 degrees", r"100(?:\.0)?")
    score, rows = score_probe([f"answer: {accepted.split('|')[0]}" for _, accepted in PROBE])
    assert score == 1.0 and all(r.right for r in rows)
    with pytest.raises(ValueError, match="answers"):
        score_probe(["too few"])


def test_assistant_loss_is_the_cross_entropy_of_the_answer_tokens_only(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finpipe.evaluation.evaluate import assistant_loss
    from finpipe_tests.helpers import default_samples

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


# one-token answers: a random tiny base scores 0 on every strict metric whatever it trained, so the promotion below
# is decided by the golden loss, deterministically (12 tokens let a 2-step adapter state a fact by chance)
EVAL = {"golden_per_family": 2, "loss_samples": 14, "max_new_tokens": 1}
TRAIN = {"quantization": "none", "max_minutes": 0, "max_steps": 8, "eval_points": 2, "max_val_samples": 8,
         "max_train_samples": 96, "batch_size": 4, "learning_rate": 5e-3, "max_seq_len": 512,
         "early_stopping_patience": 0, "curve_answers_per_family": 1}


def test_evaluate_report_promote_then_refuse_a_worse_challenger_and_survive_a_failed_evaluation(
        lake_resources, isolated_lake, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finpipe.definitions import in_groups
    from finpipe.defs.evaluation import adapter_evaluation, champion_adapter
    from finpipe.defs.models import qlora_adapter
    from finpipe.defs.resources import HuggingFaceResource
    from finpipe.market.lake import PriceLake
    from finpipe.models import registry
    from finpipe_tests.helpers import derive, ingest

    resources = lake_resources() | {"huggingface": HuggingFaceResource()}
    ingest(resources)
    assert derive(resources).success
    lineage = in_groups("models", "evaluation")
    ops = {"base_model": {"config": {"model": str(tiny_base)}}, "qlora_adapter": {"config": TRAIN},
           "adapter_evaluation": {"config": EVAL}}
    first = materialize(lineage, resources, ops)
    assert first.success
    meta = lambda result, node: {k: v.value for k, v in result.asset_materializations_for_node(node)[0].metadata.items()}  # noqa: E731
    evaluation, promotion, report = (meta(first, n) for n in ("adapter_evaluation", "champion_adapter", "evaluation_report"))
    assert evaluation["adapter_val_loss"] < evaluation["base_val_loss"]  # a random tiny base learns fast
    assert promotion["promoted"] is True and promotion["champion"] == evaluation["run_id"]
    checks = {c.check_name: c.passed for c in first.get_asset_check_evaluations()}
    assert checks == {"adapter_beats_base_on_val_loss": True, "adapter_keeps_general_skills": True,
                      "no_golden_regression_vs_champion": True}
    html, markdown = Path(report["html"]).read_text(), Path(report["markdown"]).read_text()
    assert "<th>golden set</th><th>base</th><th>adapter</th>" in html and "data:image/png;base64," in html
    # the verdict first: before the summary, in one sentence, with the headline numbers
    assert html.index("<div class='verdict promoted'><p><b>Promoted: this adapter is the new champion. First "
                      "champion") < html.index("<ul>")
    assert markdown.splitlines()[2].startswith("> **Promoted: this adapter is the new champion.")
    assert "> this adapter: golden number correctness " in markdown and "forgetting probe" in markdown.splitlines()[3]
    # the UI's popup gets the head only (its dialog focuses Close at the bottom: a long one opened scrolled down)
    ui = report["report"]
    assert ui.splitlines()[:3] == markdown.splitlines()[:3] and "## Golden set, strict metrics" in ui
    assert "| number correctness |" in ui and "Sample golden answers" not in ui and "trained as" not in ui
    assert ui.rstrip().endswith(f"`{report['html']}`") and len(ui.splitlines()) < 40
    for section in ("number correctness", "label correctness", "exact match", "Training wording vs held-out wording",
                    "Forgetting probe", "Learning curve: strict metrics vs training tokens", "promote: first champion",
                    "trained as", "LoRA (unquantized base)"):
        assert section in html and section in markdown, section
    # the report shows the same numbers as evaluation.json, with their intervals
    saved = json.loads(Path(evaluation["path"]).read_text())
    golden_adapter = saved["variants"]["adapter"]["golden"]
    number, (low, high) = golden_adapter["overall"]["number_correctness"], golden_adapter["ci"]["number_correctness"]
    assert f"{number:.3f} [{low:.2f}, {high:.2f}]" in html and low <= number <= high
    assert saved["variants"]["adapter"]["forgetting"]["score"] == evaluation["adapter_forgetting_probe"]
    assert set(saved["differences"]["adapter - base"]) == {"number_correctness", "label_correctness",
                                                           "exact_match", "format_validity"}
    golden = isolated_lake / "datasets/golden.jsonl"
    assert golden.exists() and len(golden.read_text().splitlines()) == 14
    # the end-to-end evaluation: the golden questions alone and the wild part through the answering path
    e2e = saved["variants"]["adapter"]["end_to_end"]["summary"]["parts"]
    assert set(e2e) == {"seen", "paraphrase", "wild", "unanswerable"} and e2e["wild"]["n"] == 14
    assert e2e["unanswerable"]["means"]["refusal_correctness"] == 1.0  # refused before the model, by rule
    assert len(saved["end_to_end_answers"]["adapter"]) == sum(p["n"] for p in e2e.values())
    wild = e2e["wild"]["means"]["number_correctness"]
    assert f"{wild:.3f} [" in html and "End to end: the questions alone" in markdown
    assert evaluation["adapter_end_to_end_wild_number_correctness"] == wild

    champion_pointer = registry.champion_pointer(isolated_lake)
    champion_bytes = champion_pointer.read_bytes()
    champion = registry.read_pointer(champion_pointer)  # paths resolved against the lake

    # a weaker challenger (2 small steps), trained by two processes (torch.distributed, gloo): evaluated, reported,
    # refused; the champion stays
    worse_ops = ops | {"qlora_adapter": {"config": TRAIN | {"learning_rate": 3e-3, "max_steps": 2, "eval_points": 1,
                                                            "processes": 2}}}
    second = materialize(lineage, resources, worse_ops)
    assert second.success
    assert (meta(first, "qlora_adapter")["processes"], meta(second, "qlora_adapter")["processes"]) == (1, 2)
    refused = meta(second, "champion_adapter")
    assert refused["promoted"] is False and refused["champion"] == champion["run_id"], refused["reason"]
    assert "does not improve on the champion" in refused["reason"] or "regresses" in refused["reason"]
    second_eval = json.loads((Path(meta(second, "adapter_evaluation")["path"])).read_text())
    assert second_eval["variants"]["champion"]["golden"]["loss"] < second_eval["variants"]["adapter"]["golden"]["loss"]
    second_html = Path(meta(second, "evaluation_report")["html"]).read_text()
    assert "keep the champion" in second_html
    assert "<div class='verdict kept'><p><b>Not promoted: the champion stays." in second_html
    assert f"<p>champion {champion['run_id']}: golden number correctness " in second_html
    assert champion_pointer.read_bytes() == champion_bytes
    runs = registry.RunRegistry(PriceLake(isolated_lake / "finpipe.duckdb")).runs()
    assert dict(zip(runs["run_id"], runs["status"])) == {champion["run_id"]: "champion",
                                                         meta(second, "adapter_evaluation")["run_id"]: "rejected"}
    assert dict(zip(runs["run_id"], runs["train_processes"])) == {champion["run_id"]: 1,
                                                                  meta(second, "adapter_evaluation")["run_id"]: 2}
    # the previous champion stays loadable with plain peft
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), champion["path"])

    # a failed evaluation (the newest adapter's weights are corrupt) leaves the champion untouched
    latest = registry.read_pointer(registry.latest_adapter_pointer(isolated_lake))
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
    assert warm["cumulative_train_tokens"] == fresh["train_tokens"] + warm["train_tokens"]  # the curve accumulates


# ----------------------------------------------------------------------------------- nightly automation

def test_the_nightly_schedule_runs_weekdays_after_the_us_close_over_the_documented_assets():
    from finpipe.definitions import defs
    from finpipe.defs.automation import NIGHTLY_ASSETS, nightly_retrain, nightly_schedule

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

    from finpipe.defs.resources import MarketDataResource

    when = dt.datetime(2026, 11, 25, 18, 30, tzinfo=zoneinfo.ZoneInfo("America/New_York"))  # 23:30 UTC
    live = {"market_data": MarketDataResource(source="yahoo")}
    request = nightly_schedule(dg.build_schedule_context(scheduled_execution_time=when, resources=live))
    assert request.partition_key == "2026-11-25" and request.run_key == "nightly-2026-11-25"
    assert request.run_config["ops"]["qlora_adapter"]["config"]["warm_start"] == "champion"
    assert "2026-11-25" in job.partitions_def.get_partition_keys(dt.datetime(2026, 11, 26, 1, tzinfo=dt.timezone.utc))
    # the default offline replay ends in 2013: the schedule says why it skips instead of starting a run that fails
    replay = {"market_data": MarketDataResource()}
    skipped = nightly_schedule(dg.build_schedule_context(scheduled_execution_time=when, resources=replay))
    assert isinstance(skipped, dg.SkipReason) and "serves prices up to 2013-03-01 only" in skipped.skip_message
    assert "FINPIPE_SOURCE=yahoo" in skipped.skip_message


def test_a_new_price_partition_makes_statistics_and_datasets_refresh(lake_resources):
    from finpipe.definitions import defs, in_groups

    instance = dg.DagsterInstance.ephemeral()
    resources = lake_resources()
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)

    dg.materialize(in_groups("market_data"), resources=resources, instance=instance,
                   partition_key="2013-03-01")
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    requested = {r.key.to_user_string() for r in result.results if r.true_subset.size}
    assert {"price_statistics", "instruction_samples", "dataset_split"} <= requested
    assert not requested & {"qlora_adapter", "adapter_evaluation", "champion_adapter"}  # no retraining per partition


def test_batched_greedy_answers_equal_one_by_one_answers(tiny_base):
    from finpipe.evaluation.generation import Sampling, generate, generate_batch, load_chat_model
    from finpipe_tests.helpers import default_samples

    model, tokenizer = load_chat_model(tiny_base, dtype=torch.float32)  # same precision both ways
    chats = [s.messages[:-1] for s in default_samples()[:5]]  # prompts of different lengths: left padding
    assert len({len(tokenizer.apply_chat_template(c, tokenize=False)) for c in chats}) > 1
    sampling, side = Sampling(max_new_tokens=10), tokenizer.padding_side
    one_by_one = [generate(model, tokenizer, c, sampling) for c in chats]
    lines: list[str] = []
    batched = generate_batch(model, tokenizer, chats, sampling, batch_size=3, progress=lines.append,
                             progress_every_s=0)
    assert [g.text for g in batched] == [g.text for g in one_by_one]
    assert [g.new_tokens for g in batched] == [g.new_tokens for g in one_by_one]
    assert tokenizer.padding_side == side  # restored for training code that pads on the right
    # progress within a batch (token reached, time left) and after each batch, without changing the answers
    assert any(line.startswith("  answers 1-3 of 5: token 2/10 (") and "s left)" in line for line in lines), lines
    assert any(line.startswith("  answers 4-5 of 5: token 1/10 (") for line in lines), lines
    assert lines[0] == "  answers 1-3 of 5: generating, at most 10 tokens each"  # at once: no silent first batch
    assert [line.split(" (")[0] for line in lines[1:] if "token" not in line] == ["  answers 3/5", "  answers 5/5"]


@pytest.mark.parametrize("rows", [8, 2], ids=["one-chunk", "chunks-of-2"])
def test_answers_scored_with_their_references_keep_the_answers_and_give_the_teacher_forced_loss(tiny_base, rows,
                                                                                                monkeypatch):
    from finpipe.evaluation import generation
    from finpipe.evaluation.evaluate import assistant_loss
    from finpipe.evaluation.generation import Sampling, generate_batch, load_chat_model
    from finpipe_tests.helpers import default_samples

    monkeypatch.setattr(generation, "REFERENCE_ROWS", rows)  # the vocabulary projection a few rows at a time

    model, tokenizer = load_chat_model(tiny_base, dtype=torch.float32)
    samples = default_samples()[:5]  # prompts and references of different lengths: padding on both sides
    chats, references = [s.messages[:-1] for s in samples], [s.text_of("assistant") for s in samples]
    sampling = Sampling(max_new_tokens=10)
    plain = generate_batch(model, tokenizer, chats, sampling, batch_size=3)
    scored = generate_batch(model, tokenizer, chats, sampling, batch_size=3, references=references)
    assert [g.text for g in scored] == [g.text for g in plain]  # generated from the same prompt cache
    assert all(g.reference_nll is None for g in plain)
    fused = sum(g.reference_nll for g in scored) / sum(g.reference_tokens for g in scored)
    assert fused == pytest.approx(assistant_loss(model, tokenizer, samples), rel=1e-4)
    tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert [g.reference_tokens for g in scored] == [  # each reference's own tokens, end of turn included
        tokens(tokenizer.apply_chat_template(s.messages, tokenize=False))
        - tokens(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False))
        for s, c in zip(samples, chats)]


def test_serving_merges_the_adapter_and_answers_exactly_like_the_unmerged_model(tiny_base, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finpipe.evaluation.generation import Sampling, generate, load_chat_model
    from finpipe_tests.helpers import default_samples

    torch.manual_seed(1)
    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                             LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    unmerged, tokenizer = load_chat_model(tiny_base, tmp_path / "adapter", dtype=torch.float32)
    merged, _ = load_chat_model(tiny_base, tmp_path / "adapter", merge=True, dtype=torch.float32)
    assert not hasattr(merged, "disable_adapter")  # a plain transformers model: no LoRA layers left
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    chat = default_samples()[0].messages[:-1]
    sampling = Sampling(max_new_tokens=12)
    assert generate(merged, tokenizer, chat, sampling).text == generate(unmerged, tokenizer, chat, sampling).text


def test_the_general_replay_keeps_only_right_answers_cut_after_the_answer():
    from finpipe.instructions.general import GeneralPrompt
    from finpipe.training.replay import is_kept, through_the_answer

    minus = GeneralPrompt("What is 17 minus 10?", "7", (17, 10))
    assert is_kept(minus, "17 minus 10 is 7.")
    assert not is_kept(minus, "17 - 10 = 17\n\nThe answer is: 17")  # the base's greedy mistake, once replayed
    assert not is_kept(minus, "17 - 10 = 8, so the answer is 7.")  # the right number beside a wrong one
    assert not is_kept(minus, "It is 70.") and not is_kept(minus, "  ")
    capital = GeneralPrompt("What is the capital of Spain?", "Madrid")
    assert is_kept(capital, "The capital of Spain is Madrid.") and not is_kept(capital, "It is Barcelona.")
    assert is_kept(GeneralPrompt("Name a fruit that is red.", None), "An apple.")  # open-ended: any answer
    assert through_the_answer("12 * 5 = 60\n\nThis is the result of a classic trick.", "60") == "12 * 5 = 60"
    assert through_the_answer("The capital is Madrid. It has 3 million people.", "Madrid") == "The capital is Madrid."
    assert through_the_answer("Water boils at 212.5 degrees. Yes.", "212") == "Water boils at 212.5 degrees."


def test_the_general_replay_never_asks_a_probe_question_and_its_answers_are_right():
    import re

    from finpipe.evaluation.forgetting import PROBE
    from finpipe.instructions.general import general_prompts

    def norm(text: str) -> str:
        return re.sub(r"\W+", " ", text.lower()).strip()

    prompts = general_prompts()
    assert len(prompts) == len({p.prompt for p in prompts}) > 100
    assert not {norm(p.prompt) for p in prompts} & {norm(q) for q, _ in PROBE}
    # the probe's near neighbours with another answer are out (freezing point in Fahrenheit: the probe asks Celsius)
    assert not [p.prompt for p in prompts if re.search(r"freezing|boiling|legs|bees|minutes", p.prompt)]
    arithmetic = [p for p in prompts if p.operands]
    assert len(arithmetic) == 40
    for p in arithmetic:
        a, b = p.operands
        op = re.search(r"(\+|plus|-|minus|\*|times|/|divided by)", p.prompt).group(1)
        result = {"+": a + b, "plus": a + b, "-": a - b, "minus": a - b, "*": a * b, "times": a * b,
                  "/": a / b, "divided by": a / b}[op]
        assert float(p.accepted) == result and result == int(result) > 0, p


def test_the_report_cuts_answers_visibly_and_shows_only_measured_metrics():
    from finpipe.evaluation.report import cut, metrics_rows

    answer = "AAPL closed at 430.47 on 2013-03-01, down 2.1% over 5 sessions, with volatility at 31.2% annualized."
    assert cut(answer, 200) == answer
    short = cut(answer, 40)
    assert short == "AAPL closed at 430.47 on 2013-03-01…" and len(short) <= 40  # at a word, marked
    scored = {"golden": {"overall": {"number_correctness": 0.9}, "loss": 1.2}, "val": None, "forgetting": None}
    rows = {r["metric"]: r for r in metrics_rows({"adapter": scored, "base": scored | {"golden": None}})}
    assert rows["golden number correctness"] == {"metric": "golden number correctness", "adapter": 0.9, "base": None}
    assert not any(m.startswith("val ") or m.startswith("latency") or m == "forgetting probe" for m in rows), rows


def test_a_simulated_night_runs_through_the_schedules_own_job(lake_resources, isolated_lake, tiny_base):
    """A night as the schedule starts it, offline: the replay's clock at 2013-02-28 (FINPIPE_REPLAY_AS_OF in a
    deployment), the schedule's run request for that evening, executed as the `nightly_retrain` job with the request's
    partition, tags and run config (warm start from the champion). The new session lands in the lake and the night's
    adapter is trained, evaluated and promoted."""
    import zoneinfo

    from finpipe.definitions import job_with_resources
    from finpipe.defs.automation import nightly_retrain, nightly_schedule
    from finpipe.defs.resources import HuggingFaceResource
    from finpipe.market.lake import PriceLake
    from finpipe.models import registry
    from finpipe_tests.helpers import ingest

    resources = lake_resources(replay_as_of="2013-02-28") | {"huggingface": HuggingFaceResource()}
    ingest(resources, last="2013-02-27")  # the lake as the night before left it
    evening = dt.datetime(2013, 2, 28, 18, 30, tzinfo=zoneinfo.ZoneInfo("America/New_York"))
    request = nightly_schedule(dg.build_schedule_context(scheduled_execution_time=evening, resources=resources))
    assert isinstance(request, dg.RunRequest) and request.partition_key == "2013-02-28"
    tiny_ops = {"base_model": {"config": {"model": str(tiny_base)}},
                "qlora_adapter": {"config": TRAIN | request.run_config["ops"]["qlora_adapter"]["config"]},
                "adapter_evaluation": {"config": EVAL}}
    night = job_with_resources(nightly_retrain.name, resources).execute_in_process(
        run_config={"ops": tiny_ops}, partition_key=request.partition_key, tags=request.tags)
    assert night.success and night.dagster_run.tags["finpipe/trigger"] == "nightly"
    lake = PriceLake(isolated_lake / "finpipe.duckdb")
    assert lake.query("SELECT max(date) AS last FROM prices")["last"][0] == dt.date(2013, 2, 28)
    promoted = {k: v.value for k, v in night.asset_materializations_for_node("champion_adapter")[0].metadata.items()}
    assert promoted["promoted"] is True  # the first night: no champion yet, so no warm start either
    assert registry.read_pointer(registry.champion_pointer(isolated_lake))["run_id"] == promoted["champion"]
    recorded = registry.RunRegistry(lake).get(promoted["champion"])  # what started it, for `finpipe runs`
    assert recorded["run_trigger"] == "nightly" and recorded["trigger_reason"] is None
