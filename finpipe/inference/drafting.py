"""Draft tokens for speculative greedy decoding, looked up rather than generated (prompt lookup, an n-gram cache).

Why: a grounded answer mostly repeats what is in front of the model — the tickers, numbers and phrases of its
prompt — and the phrasing of the answers it gave before ("over the last 30 trading days, which puts its annualized
20-day volatility at"). Guessing the next few tokens from those, and checking the guess with one forward pass of
the model over all of them, yields several tokens for about the price of one on a CPU, where a decode step's cost
is reading the weights. The model still decides every token: a draft token is kept only where greedy decoding
picks it, so the answer is the one the model gives token by token (up to the last bits of the logits).
"""

from __future__ import annotations

from collections import deque

#: longest n-gram matched; a longer match is tried first, as it predicts better
MAX_NGRAM = 4
#: earlier answers kept for drafting (an ``n``-gram of at least 2 must match there: 1 token is too weak a cue)
HISTORY_ANSWERS = 64


class PromptLookup:
    """Drafts the tokens that followed the latest earlier occurrence of the sequence's last ``n`` tokens, searching
    the prompt and answer so far, then the answers given before (``remember``)."""

    def __init__(self, history_answers: int = HISTORY_ANSWERS, max_ngram: int = MAX_NGRAM):
        self.max_ngram = max_ngram
        self._history: deque[list[int]] = deque(maxlen=history_answers)
        self._index: dict[tuple[int, ...], tuple[list[int], int]] = {}  # n-gram -> (answer, where it continues)

    def remember(self, answer: list[int]) -> None:
        """Keep an answer for drafting later ones (the oldest goes when ``history_answers`` are kept)."""
        if not answer:
            return
        self._history.append(list(answer))
        self._index = {}
        for kept in self._history:  # oldest first: a later answer's occurrence wins
            for n in range(2, self.max_ngram + 1):
                for i in range(len(kept) - n):
                    self._index[tuple(kept[i:i + n])] = (kept, i + n)

    def draft(self, sequence: list[int], count: int) -> list[int]:
        """Up to ``count`` tokens guessed to follow ``sequence`` (the prompt and the answer so far); [] if none."""
        if count <= 0:
            return []
        for n in range(min(self.max_ngram, len(sequence) - 1), 0, -1):
            tail = sequence[-n:]
            if found := _follows(sequence, tail, count):
                return found
            if n >= 2 and (hit := self._index.get(tuple(tail))) is not None:
                answer, at = hit
                return answer[at:at + count]
        return []


def _follows(tokens: list[int], tail: list[int], count: int) -> list[int]:
    """The ``count`` tokens after the latest occurrence of ``tail`` in ``tokens`` that has a token after it (so not
    ``tail`` itself when it ends ``tokens``)."""
    n = len(tail)
    first = tail[0]
    for i in range(len(tokens) - n - 1, -1, -1):
        if tokens[i] == first and tokens[i:i + n] == tail:
            return tokens[i + n:i + n + count]
    return []
