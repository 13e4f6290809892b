"""Token counts for the sequence-length budget.

With a tokenizer (the base model's, once one is configured) counts are exact, chat template included.
Without one, ``estimate_tokens`` is a deliberately pessimistic stand-in for Llama-style byte-level BPE
vocabularies: every digit is a token (they split numbers digit by digit), every word and every
punctuation mark is at least one token, plus a few tokens of chat-template overhead per message.
"""

from __future__ import annotations

import re
from typing import Callable

PIECE = re.compile(r"\d|[^\W\d_]+|[^\w\s]|_")
TEMPLATE_OVERHEAD_PER_MESSAGE = 5

TokenCounter = Callable[[list[dict[str, str]]], int]


def estimate_tokens(messages: list[dict[str, str]]) -> int:
    total = 0
    for m in messages:
        content = m.get("content", "")
        words = PIECE.findall(content)
        # long words split into several sub-word tokens: one per 6 characters beyond the first
        total += sum(1 + max(0, (len(w) - 1) // 6) for w in words) + TEMPLATE_OVERHEAD_PER_MESSAGE
    return total
