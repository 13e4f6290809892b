"""Questions as users type them, for training: terse, lower case, company names, typos, label bait.

The family question sets (``finpipe.instructions.families.QUESTIONS``) are complete sentences naming the
ticker. People write "aapl rsi 14", "is apple oversold right now", "waht did Microsoft close at". A share of
the training samples (``DatasetSpec.user_phrasing_share``) is asked in a wording generated here instead: a
family's user-style core, then transforms (the company's common name for the ticker, lower case, a typo in a
filler word, a dropped question mark), all drawn from the sample's own seeded generator.

Every generated wording must reach its family through ``finpipe.inference.context.ground()`` (tested: the
model is trained on the very context a user's question gets). None equals a wording of the held-out sets
(``finpipe.evaluation.paraphrases`` and ``finpipe.evaluation.wild``), which this module never imports (tested).
Placeholders: {t} ticker, {tl} ticker in lower case, {name} the common name, {n} the window; comparisons
{a}/{b}, {al}/{bl}, {name_a}/{name_b}.
"""

from __future__ import annotations

import random
import re

from finpipe.inference.context import common_name

USER_PHRASINGS: dict[str, tuple[str, ...]] = {
    "price": (
        "{t} last close?",
        "latest close for {name}",
        "{tl} open, high, low and close",
        "what did {name} close at",
        "{t} ohlc and volume",
        "how did {tl} trade in the latest session",
        "tell me about {name}",
        "what's the latest on {tl}",
        "{tl}?",
        "{name} last trading day summary",
    ),
    "performance": (
        "{tl} return last {n} days",
        "how did {name} perform over {n} sessions",
        "{t}: up or down over {n} trading days?",
        "{name}'s return over the past {n} days?",
        "what did {tl} return in the last {n} sessions",
        "has {name} gained over the past {n} days",
        "{t} performance, {n} days",
        "{tl} gain or loss over {n} sessions",
    ),
    "volatility": (
        "how risky is {tl}",
        "{name} volatility?",
        "{t} vol level",
        "is {name} a high risk stock right now",
        "risk check: {tl}",
        "how volatile has {t} been",
        "is {tl} low risk",
        "what's {name}'s risk level",
    ),
    "trend": (
        "{tl} trend now",
        "is {name} trending up",
        "{t} vs its 20- and 50-day smas",
        "trend for {name}?",
        "is {tl} in a downtrend",
        "how is {t} trending",
        "{name} moving average check",
        "is {tl} moving sideways",
    ),
    "momentum": (
        "{tl} rsi 14",
        "is {name} oversold right now",
        "what's {t}'s rsi",
        "momentum on {tl}?",
        "is {tl} overbought",
        "{name} rsi reading",
        "is {t} neutral on rsi",
        "rsi check {tl}",
    ),
    "range": (
        "{tl} 52-week range",
        "how far is {name} below its 52-week high",
        "is {t} near its 52w high",
        "{name} drawdown?",
        "is {tl} in correction territory",
        "where is {t} in its 52-week range",
        "has {name} entered a bear market",
        "{tl} yearly low",
    ),
    "comparison": (
        "{a} vs {b} over {n} days",
        "{al} or {bl}, {n} sessions: which did better?",
        "did {name_a} outperform {name_b} over {n} trading days",
        "{a} versus {b}, {n}-day return",
        "compare {name_a} and {name_b} over the last {n} days",
        "which is ahead over {n} days, {al} or {bl}",
        "{a}/{b} {n} day returns",
        "{name_a} or {name_b} - better {n}-day return?",
    ),
}
#: filler words and the typos people make in them (never a word that selects a family or a ticker)
TYPOS = {"what": "waht", "how": "hwo", "the": "teh", "right": "rigth", "over": "ovr", "last": "lsat", "did": "ddi"}
#: tickers this short must stay in capitals to be read as tickers (``finpipe.inference.context``)
_SHORT_TICKER = 2


def _lowerable(values: dict[str, str]) -> bool:
    return all(len(values[k]) > _SHORT_TICKER for k in ("t", "a", "b") if k in values)


def user_question(family: str, facts: dict[str, str], names: dict[str, str], rng: random.Random) -> str:
    """A user-style wording of a question about ``facts`` (a rendered sample's facts), drawn from ``rng``."""
    template = rng.choice(USER_PHRASINGS[family])
    if family == "comparison":
        a, b = facts["a"], facts["b"]
        values = {"a": a, "b": b, "al": a.lower(), "bl": b.lower(), "n": facts["n"],
                  "name_a": common_name(a, names), "name_b": common_name(b, names)}
    else:
        t = facts["t"]
        values = {"t": t, "tl": t.lower(), "name": common_name(t, names), "n": facts.get("n", "")}
    if not _lowerable(values):  # "a"/"ge" would not be read as tickers: keep them as typed symbols
        values |= {"tl": values.get("t", ""), "al": values.get("a", ""), "bl": values.get("b", "")}
    question = template.format(**values)
    if rng.random() < 0.25 and _lowerable(values):
        question = question.lower()
    if rng.random() < 0.2:
        words = [w for w in re.findall(r"[a-z]+", question) if w in TYPOS]
        if words:
            word = rng.choice(words)
            question = re.sub(rf"\b{word}\b", TYPOS[word], question, count=1)
    if rng.random() < 0.3:
        question = question.rstrip("?")
    return question
