"""The wild part of the end-to-end evaluation: questions typed the way people type them.

Lower case and terse ("aapl rsi?", "msft closing px"), no family keyword ("is IBM in a slump", "how did aapl do
this week"), company names instead of tickers ("How volatile is Apple?"), two tickers in either order, and
questions the lake cannot answer (P/E, earnings, news, "is it a buy?"). Each grounded wild question re-asks a
golden sample (same ticker, date and facts), so it is scored strictly against that sample's facts; it reaches the
model only through ``finpipe.inference.answering``, exactly as ``finpipe ask`` would send it.

Kept apart like ``finpipe.evaluation.paraphrases``: nothing that builds training data imports this module (a test
guards it, and another checks that no training phrasing equals a wild one). Bump ``WILD_VERSION`` when the
wordings change: wild scores of different versions are not comparable.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Sequence

from finpipe.inference.context import common_name
from finpipe.instructions.samples import Sample

WILD_VERSION = 1
WILD_ORIGIN = "finpipe:wild"
UNANSWERABLE = "unanswerable"

#: per family, wordings people type; placeholders: {t} ticker, {tl} ticker in lower case, {name} the company's
#: common name, {n} the window; comparison: {a}/{b} (and {al}/{bl}, {name_a}/{name_b}). "{b} ... {a}" asks in the
#: other order.
WILD_QUESTIONS: dict[str, tuple[str, ...]] = {
    "price": (
        "{tl} px?",
        "what was {name}'s final price",
        "{tl} closing px",
        "how did {t} trade today",
        "whats the last price of {name}",
        "{t} quote pls",
        "where did {name} close",
        "{tl} volume and range today?",
        "gimme {tl} open high low close",
        "what's up with {t}?",
    ),
    "performance": (
        "how did {tl} do over {n} days?",
        "{tl} {n}d return",
        "is {name} up or down in the last {n} sessions",
        "{t} last {n} trading days - gain or loss?",
        "how much did {name} move over the past {n} days",
        "{tl} perf {n} sessions",
        "did {tl} gain over {n} days",
        "what's {t} returned in {n} days",
        "{name} {n}-day performance?",
        "returns for {tl}, {n} days",
    ),
    "volatility": (
        "how volatile is {name}?",
        "{tl} vol?",
        "is {tl} risky",
        "how choppy has {name} been",
        "{t} risk level",
        "is {name} a calm stock lately",
        "how big are {tl}'s swings",
        "{tl} volatility pls",
        "is {t} turbulent right now",
        "what's the risk on {name}",
    ),
    "trend": (
        "{tl} trend?",
        "is {name} in an uptrend",
        "{tl} vs its moving averages",
        "which direction is {t} heading",
        "{t} above its 50 day ma?",
        "is {name} trending",
        "{tl} sma 20 and 50",
        "where's {name} vs its averages",
        "trend check on {tl}",
        "is {t} trending down",
    ),
    "momentum": (
        "{tl} rsi?",
        "is {name} overheated",
        "is {tl} oversold",
        "{t} momentum",
        "is {name} overbought right now",
        "rsi of {tl} pls",
        "is {t} stretched",
        "{name} momentum check",
        "how's {tl}'s rsi looking",
        "is there momentum in {name}",
    ),
    "range": (
        "is {name} in a slump",
        "is {t} in a correction?",
        "{tl} 52w high",
        "how far off its high is {name}",
        "is {tl} in a bear market",
        "{t} distance from the 52-week high",
        "{name} yearly high and low",
        "is {tl} near its peak",
        "how deep is {name}'s drawdown",
        "{tl} 52 week range",
    ),
    "comparison": (
        "{al} vs {bl}, last {n} sessions",
        "{b} or {a}: who did better over {n} days?",
        "did {name_a} beat {name_b} over the past {n} trading days",
        "{bl} vs {al} {n}d",
        "which was stronger over {n} days, {name_b} or {name_a}?",
        "{a} or {b} over {n} sessions",
        "{name_a} vs {name_b}: {n}-day returns",
        "compare {bl} with {al} over {n} days",
        "who won, {a} or {b}, in the last {n} sessions",
        "{b} vs {a} - {n} day performance",
    ),
}
#: everyday spans instead of a number of days, for a golden sample with that window (every other one)
WILD_SPAN_QUESTIONS: dict[str, dict[str, str]] = {
    "performance": {"5": "how did {tl} do this week?", "30": "how has {name} done this month"},
    "comparison": {"5": "{al} vs {bl} this week", "30": "who did better this month, {name_a} or {name_b}?"},
}
#: questions the lake cannot answer (scored correct only when the answer says so and invents no number)
UNANSWERABLE_QUESTIONS: tuple[str, ...] = (
    "what is {t}'s P/E ratio?",
    "when does {name} report earnings?",
    "any news on {tl}?",
    "is {tl} a buy?",
    "what's {name}'s market cap",
    "{t} dividend yield?",
    "should I sell {t}?",
    "where will {tl} trade next week?",
    "what do analysts say about {name}?",
    "{tl} eps?",
    "price target for {t}?",
    "why did {name} drop?",
)
# a comparison wording that names the second ticker first
_B_FIRST = re.compile(r"^[^{]*(?:\{(?:n|t)\}[^{]*)*\{(?:b|bl|name_b)\}")
# an answer that says the data does not cover the question
_DECLINES = re.compile(r"does not cover|doesn't cover|not cover|cannot answer|can't answer|can only answer|no data"
                       r"|not (?:in|part of) (?:the|finpipe's) (?:market )?data", re.I)


@dataclass
class WildQuestion:
    """A question as typed, with what a correct answer states (``sample``: None for an unanswerable one)."""

    question: str
    family: str  # a question family, or ``UNANSWERABLE``
    tickers: list[str]
    as_of: str | None
    sample: Sample | None = None
    #: the golden sample it re-asks (for the paired view in reports)
    golden_id: str | None = None
    part: str = "wild"
    extra: dict = field(default_factory=dict)


def _swapped(facts: dict[str, str]) -> dict[str, str]:
    """A comparison's facts with its two tickers named in the other order (the answer names them so)."""
    pairs = {"a": "b", "b": "a", "ra": "rb", "rb": "ra"}
    return {pairs.get(k, k): v for k, v in facts.items()}


def _reasked(golden: Sample, question: str, facts: dict[str, str], tickers: list[str]) -> Sample:
    messages = [dict(m) for m in golden.messages]
    context = golden.text_of("user").rsplit("\n\nQuestion: ", 1)[0]
    messages[1]["content"] = f"{context}\n\nQuestion: {question}"
    return Sample(id=hashlib.sha256(f"wild|{golden.id}|{question}".encode()).hexdigest()[:16], family=golden.family,
                  tickers=tickers, as_of=golden.as_of, messages=messages, expected=dict(golden.expected),
                  labels=dict(golden.labels), origin=WILD_ORIGIN, facts=facts)


def build_wild(golden: Sequence[Sample], names: dict[str, str], seed: int = 0) -> list[WildQuestion]:
    """One wild question per golden sample (its family's wordings in turn, seeded), and the unanswerable ones over
    the golden set's tickers and dates."""
    out: list[WildQuestion] = []
    by_family: dict[str, list[Sample]] = {}
    for s in golden:
        if s.facts and s.family in WILD_QUESTIONS:
            by_family.setdefault(s.family, []).append(s)
    for family, samples in sorted(by_family.items()):
        wordings = list(WILD_QUESTIONS[family])
        random.Random(f"{seed}|wild|{family}").shuffle(wordings)
        spans = dict(WILD_SPAN_QUESTIONS.get(family, {}))
        for i, s in enumerate(sorted(samples, key=lambda x: x.id)):
            template = wordings[i % len(wordings)]
            if s.facts.get("n") in spans:  # the first sample of that window is asked with the span's words
                template = spans.pop(s.facts["n"])
            facts, tickers = dict(s.facts), list(s.tickers)
            if family == "comparison":
                a, b = facts["a"], facts["b"]
                if _B_FIRST.match(template):
                    facts, tickers = _swapped(facts), [b, a]
                values = {"a": a, "b": b, "al": a.lower(), "bl": b.lower(), "n": facts["n"],
                          "name_a": common_name(a, names), "name_b": common_name(b, names)}
            else:
                t = facts["t"]
                values = {"t": t, "tl": t.lower(), "name": common_name(t, names), "n": facts.get("n", "")}
            question = template.format(**values)
            out.append(WildQuestion(question, family, tickers, s.as_of, _reasked(s, question, facts, tickers), s.id))
    anchors = sorted({(s.tickers[0], s.as_of) for s in golden if s.tickers and s.facts and s.family != "comparison"})
    rng = random.Random(f"{seed}|wild|{UNANSWERABLE}")
    for template in UNANSWERABLE_QUESTIONS:
        t, as_of = rng.choice(anchors) if anchors else ("AAPL", None)
        question = template.format(t=t, tl=t.lower(), name=common_name(t, names))
        out.append(WildQuestion(question, UNANSWERABLE, [t], as_of, None, part=UNANSWERABLE))
    return out


def wild_hash(questions: Sequence[WildQuestion]) -> str:
    text = "\n".join(f"{q.family}|{q.as_of}|{q.question}" for q in questions)
    return hashlib.sha256(f"v{WILD_VERSION}\n{text}".encode()).hexdigest()[:12]


def declines(answer: str) -> bool:
    """Whether an answer says the data does not cover the question."""
    return bool(_DECLINES.search(answer))
