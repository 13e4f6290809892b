"""Text-level answer metrics, each in [0, 1] (the strict, fact-level ones are in ``finpipe.evaluation.strict``):

- token F1: SQuAD-style bag-of-words F1 against the reference answer (text overlap, a secondary signal);
- ROUGE-L: F-measure of the longest common subsequence of tokens;
- format validity: non-empty, no chat-template debris, no NaN, ends like a sentence.
"""

from __future__ import annotations

import re
from collections import Counter

TOKEN = re.compile(r"[A-Za-z]+|\d+(?:\.\d+)?")
TEMPLATE_DEBRIS = re.compile(r"<\|im_(start|end)\|>|<\|endoftext\|>|^(system|user|assistant)\s*$", re.MULTILINE)


def tokens(text: str) -> list[str]:
    return [t.lower() for t in TOKEN.findall(text)]


def token_f1(answer: str, reference: str) -> float:
    a, r = tokens(answer), tokens(reference)
    if not a or not r:
        return float(a == r)
    common = sum((Counter(a) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(answer: str, reference: str) -> float:
    a, r = tokens(answer), tokens(reference)
    if not a or not r:
        return float(a == r)
    # LCS by dynamic programming over the shorter sequence
    prev = [0] * (len(r) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(r, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def format_valid(answer: str) -> bool:
    stripped = answer.strip()
    return (
        bool(stripped)
        and not TEMPLATE_DEBRIS.search(stripped)
        and not re.search(r"(?i)\bnan\b", stripped)
        and stripped[-1] in ".!?)%"
    )
