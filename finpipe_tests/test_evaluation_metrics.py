"""Answer metrics on hand-written answers: the strict scorer must fail every kind of wrong answer, and the text
metrics match hand-computed values."""

import random

import pytest

from finpipe.evaluation.metrics import format_valid, rouge_l, token_f1
from finpipe.evaluation.strict import strict_score
from finpipe.instructions import families as fam
from finpipe_tests.helpers import default_samples

# one statistics row, written by hand: IBM on a quiet day
IBM = dict(ticker="IBM", name="IBM", as_of="2013-03-01", open=200.0, high=202.5, low=199.1, close=201.34,
           volume=4123456, daily_return=-0.0123, ret_1d=-0.0123, ret_3d=0.02, ret_5d=0.0512, ret_7d=-0.001, ret_14d=0.03,
           ret_30d=0.1,
           volatility_20d=0.1778, max_drawdown_252d=-0.1234, sma_10=200.0, sma_20=198.0, sma_50=190.0,
           pct_vs_sma_20=201.34 / 198 - 1, pct_vs_sma_50=201.34 / 190 - 1, rsi_14=48.3, high_52w=215.0, low_52w=180.0,
           dist_52w_high=201.34 / 215 - 1, dist_52w_low=201.34 / 180 - 1)
MSFT = dict(IBM, ticker="MSFT", name="MSFT", close=28.0, ret_5d=-0.02, volatility_20d=0.25)


def score(family: str, rendered: fam.Rendered, answer: str):
    context = fam.context_block("x", "2013-03-01", rendered.context) + "\n\nQuestion: " + rendered.question
    return strict_score(family, rendered.facts, rendered.labels, context, answer)


def render(family: str, seed: int = 0) -> fam.Rendered:
    if family == "comparison":
        return fam.comparison(IBM, MSFT, random.Random(seed))
    return fam.SINGLE_TICKER_FAMILIES[family][0](IBM, random.Random(seed))


def test_the_reference_answer_scores_full_marks():
    for family in fam.ALL_FAMILIES:
        for seed in range(4):  # several question phrasings and windows of each family
            rendered = render(family, seed)
            s = score(family, rendered, rendered.answer)
            assert (s.number_correctness, s.exact_match, s.problems) == (1.0, 1.0, []), (family, rendered.answer)
            assert s.label_correctness == (None if family == "price" else 1.0)


def test_every_reference_answer_of_the_replay_dataset_scores_full_marks():
    for sample in default_samples():
        s = strict_score(sample.family, sample.facts, sample.labels, sample.text_of("user"), sample.text_of("assistant"))
        assert s.problems == [] and s.exact_match == 1.0, (sample.family, sample.text_of("assistant"), s.problems)


def test_the_context_states_each_label_beside_its_evidence_and_the_reference_is_one_form():
    """The rules decide the labels in code and the context shows them, so the model states, not computes, them;
    every sample of a family answers in its first form (a deterministic target)."""
    for sample in default_samples():
        context = sample.text_of("user")
        for slot, label in sample.labels.items():
            if slot == "outperformer":
                expected = ("- result: neither outperformed" if label == fam.TIE else
                            f"- result: {label} outperformed {sample.facts['l']}")
            elif slot == "move":
                expected = f"- {sample.facts['n']}-day return: {sample.facts['ret']} ({label})"
            else:
                line = {"risk": "risk level", "trend": "trend", "momentum": "momentum",
                        "range": "52-week range position"}[slot]
                expected = f"- {line}: {label}"
            assert expected in context.splitlines(), (sample.family, expected, context)
        forms = fam.FORMS[sample.family]
        assert sample.text_of("assistant") == forms.applicable(sample.facts)[0].format(**sample.facts)


def test_a_wrong_label_fails_and_two_labels_fail_even_when_one_is_right():
    v = render("volatility")
    assert v.labels == {"risk": "low"}  # 17.78% < 20%
    wrong = score("volatility", v, v.answer.replace("low", "medium"))
    assert wrong.label_correctness == 0.0 and wrong.number_correctness == 1.0 and wrong.exact_match == 0.0
    both = score("volatility", v, v.answer + " Some would call it high.")
    assert both.label_correctness == 0.0
    assert any("names 'low' and 'high'" in p for p in both.problems)


def test_a_label_inside_another_word_is_no_label():
    t = render("trend")
    # "down" in "drawdown", "up" in "upper", "low" in "below": none of them is a label
    answer = "The upper band and the drawdown say nothing; it trades below its average."
    s = score("trend", t, answer)
    assert s.label_correctness == 0.0 and any("names no label" in p for p in s.problems)


def test_swapped_entities_in_a_comparison_fail_numbers_and_label():
    c = render("comparison", 1)
    assert c.labels == {"outperformer": "IBM"}
    swapped = c.answer.replace("IBM", "@").replace("MSFT", "IBM").replace("@", "MSFT")
    s = score("comparison", c, swapped)
    assert s.label_correctness == 0.0
    assert s.number_correctness == pytest.approx(1 / 3, abs=1e-4)  # only the pair-level gap is still right
    assert {p.split(":")[0] for p in s.problems} >= {"IBM ret_5d_pct", "MSFT ret_5d_pct"}


def test_a_comparison_in_a_sentence_of_its_own_is_read_by_ticker_and_still_fails_when_swapped():
    """"GOOG returned +1.43%, AAPL returned +1.06%, and ..." (the model's own wording) states each return for the
    ticker before it: right numbers are right, not exact; the same sentence with the returns swapped is wrong."""
    c = render("comparison", 1)
    f = c.facts
    tail = f", and the {f['n']}-day return gap was {f['gap']} percentage points: {f['w']} outperformed {f['l']}."
    own = score("comparison", c, f"{f['a']} returned {f['ra']}, {f['b']} returned {f['rb']}" + tail)
    assert (own.number_correctness, own.label_correctness, own.exact_match, own.problems) == (1.0, 1.0, 0.0, [])
    swapped = score("comparison", c, f"{f['a']} returned {f['rb']}, {f['b']} returned {f['ra']}" + tail)
    assert swapped.number_correctness == pytest.approx(1 / 3, abs=1e-4)
    assert f"{f['a']} ret_5d_pct: stated {f['rb'].rstrip('%').lstrip('+')}, fact {f['ra'].rstrip('%').lstrip('+')}" \
        in swapped.problems
    # one word alone still attributes nothing: "is 7.12" next to no ticker is no claim about the gap or a return
    vague = score("comparison", c, f"The return is {f['ra']}.")
    assert vague.number_correctness == 0.0


def test_a_flipped_sign_is_a_wrong_number():
    v = render("volatility")
    s = score("volatility", v, v.answer.replace("-12.34%", "+12.34%"))
    assert s.number_correctness == 0.5 and "IBM max_drawdown_252d_pct: stated 12.34, fact -12.34" in s.problems
    t = render("trend")  # a magnitude whose side word is flipped
    flipped = t.answer.replace("above the 20-day", "below the 20-day").replace("above its 20-day", "below its 20-day")
    assert flipped != t.answer
    assert score("trend", t, flipped).number_correctness < 1.0


def test_a_number_in_the_wrong_field_is_wrong_in_both_fields():
    p = render("price")
    assert "opened at 200.00" in p.answer and "closed at 201.34" in p.answer
    swapped = p.answer.replace("opened at 200.00", "opened at 201.34").replace("closed at 201.34", "closed at 200.00")
    s = score("price", p, swapped)
    assert s.number_correctness == pytest.approx(4 / 6, abs=1e-4)
    assert "IBM close: stated 200.00, fact 201.34" in s.problems and "IBM open: stated 201.34, fact 200.00" in s.problems


def test_invented_numbers_and_another_ticker_count_against_the_answer():
    v = render("volatility")
    invented = score("volatility", v, v.answer + " AAPL closed at 999999.99.")
    assert invented.number_correctness == pytest.approx(2 / 3, abs=1e-4)
    assert any("999999.99" in p for p in invented.problems)
    # the answer from the issue: confident, well formed, and wrong
    bad = score("volatility", v, "IBM closed at 185.51, with a 2.96% annualized 20-day volatility of -23.88%, "
                                 "so its risk level is low.")
    assert bad.number_correctness == 0.0 and bad.exact_match == 0.0


def test_exact_match_accepts_every_answer_form_and_nothing_else():
    t = render("trend")
    for form in fam.TREND.renderings(t.facts):
        assert score("trend", t, "  " + form.replace(" ", "\n", 1)).exact_match == 1.0  # whitespace is normalized
    assert score("trend", t, t.answer.rstrip(".") + "!").exact_match == 0.0


def test_samples_without_facts_are_not_scored_strictly():
    assert strict_score("external", {}, {}, "context", "anything").number_correctness is None


def test_token_f1_by_hand():
    # answer tokens: the trend is up (4); reference: the trend is down today (5); common: the trend is (3)
    p, r = 3 / 4, 3 / 5
    assert token_f1("The trend is up", "the trend is down today") == pytest.approx(2 * p * r / (p + r))
    assert token_f1("", "") == 1.0 and token_f1("a", "") == 0.0


def test_rouge_l_by_hand():
    # LCS of [a b c d e] and [a x c y e] is [a c e] = 3
    assert rouge_l("a b c d e", "a x c y e") == pytest.approx(3 / 5)
    assert rouge_l("same words here", "same words here") == 1.0
    assert rouge_l("nothing", "else") == 0.0


def test_format_validity():
    assert format_valid("AAPL closed at 430.47.")
    assert not format_valid("")
    assert not format_valid("AAPL closed at<|im_end|>")
    assert not format_valid("The return was nan.")
    assert not format_valid("AAPL closed at 430")  # cut off mid-sentence
