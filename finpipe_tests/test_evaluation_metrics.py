"""Answer metrics on hand-made answers with hand-computed scores."""

import pytest

from finpipe.evaluation.metrics import format_valid, label_accuracy, numeric_fidelity, rouge_l, token_f1


def test_numeric_fidelity_counts_expected_numbers_within_tolerance_ignoring_sign():
    expected = {"close": 430.47, "ret_5d_pct": -2.48, "volume": 19730300.0}
    assert numeric_fidelity("AAPL closed at 430.47, down 2.48% on 19,730,300 shares.", expected) == 1.0
    assert numeric_fidelity("AAPL closed at 430.48 and fell 2.48%.", expected) == pytest.approx(2 / 3)  # 1 cent off ok
    assert numeric_fidelity("AAPL closed at 431.47.", expected) == 0.0
    assert numeric_fidelity("anything", {}) is None


def test_label_accuracy_is_the_share_of_labels_stated():
    assert label_accuracy("The trend is up and risk is low.", {"trend": "up", "risk": "low"}) == 1.0
    assert label_accuracy("The trend is sideways; risk is low.", {"trend": "up", "risk": "low"}) == 0.5
    assert label_accuracy("x", {}) is None


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
