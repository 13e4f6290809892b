"""Draft lookup for speculative decoding (finpipe.inference.drafting): what it proposes, from where, how much."""

from __future__ import annotations

from finpipe.inference.drafting import PromptLookup


def test_drafts_what_followed_the_latest_earlier_occurrence_of_the_tail():
    lookup = PromptLookup()
    sequence = [1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 2, 3]
    assert lookup.draft(sequence, 3) == [5, 6, 7]  # the later "2 3" wins over the first
    assert lookup.draft(sequence, 1) == [5]
    assert lookup.draft(sequence, 0) == []


def test_a_longer_match_beats_a_more_recent_shorter_one():
    lookup = PromptLookup()
    sequence = [8, 1, 2, 3, 40, 41, 3, 50, 1, 2, 3]  # "3" last followed by 50; "1 2 3" by 40 41
    assert lookup.draft(sequence, 2) == [40, 41]


def test_no_earlier_occurrence_no_draft():
    lookup = PromptLookup()
    assert lookup.draft([1, 2, 3, 4], 3) == []
    assert lookup.draft([7], 3) == []
    assert lookup.draft([], 3) == []


def test_earlier_answers_are_drafted_from_on_two_tokens_or_more():
    lookup = PromptLookup()
    lookup.remember([10, 11, 12, 13, 14])
    assert lookup.draft([99, 10, 11], 3) == [12, 13, 14]
    assert lookup.draft([99, 11], 3) == []  # one token is too weak a cue from another answer
    assert lookup.draft([11, 12, 99, 11], 2) == [12, 99]  # the sequence itself comes first


def test_history_is_bounded_and_newest_wins():
    lookup = PromptLookup(history_answers=2)
    lookup.remember([1, 2, 3])
    lookup.remember([1, 2, 4])
    assert lookup.draft([0, 1, 2], 1) == [4]
    lookup.remember([5, 6, 7])
    lookup.remember([8, 9, 10])  # [1, 2, 4] is gone
    assert lookup.draft([0, 1, 2], 1) == []
