"""The fact check: every number an answer states must appear in its context or be derivable from it.

"Derivable" means the absolute difference of two context *percentages* (the gap in percentage points
between two returns), rounded as the answer rounds it. Signs are ignored ("fell 1.20%" states the context's
"-1.20%"). Dates count as one token, so 2013-03-01 is not read as the numbers 2013, 3 and 1.
"""

from __future__ import annotations

import itertools
import re

DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
PERCENT = re.compile(r"([+-]?)(\d[\d,]*(?:\.\d+)?)%")
DERIVED_TOLERANCE = 0.0051  # half a unit in the 2nd decimal, plus float slack


def numbers_in(text: str) -> tuple[list[float], list[str]]:
    """(numbers, dates) stated in ``text``; numbers as absolute values."""
    dates = DATE.findall(text)
    rest = DATE.sub(" ", text)
    numbers = []
    for token in NUMBER.findall(rest):
        cleaned = token.replace(",", "")
        if cleaned.replace(".", "").isdigit():
            numbers.append(float(cleaned))
    return numbers, dates


def unsupported_numbers(answer: str, context: str) -> list[str]:
    """Numbers and dates in ``answer`` that ``context`` neither states nor lets one derive. Empty = pass."""
    ctx_numbers, ctx_dates = numbers_in(context)
    ans_numbers, ans_dates = numbers_in(answer)
    stated = set(ctx_numbers)
    missing = [d for d in ans_dates if d not in ctx_dates]
    derived = None
    for value in ans_numbers:
        if value in stated:
            continue
        if derived is None:
            percents = sorted({float(sign + num.replace(",", "")) for sign, num in PERCENT.findall(context)})
            derived = [abs(a - b) for a, b in itertools.combinations(percents, 2)]
        if not any(abs(value - x) <= DERIVED_TOLERANCE for x in derived):
            missing.append(f"{value:g}")
    return missing
