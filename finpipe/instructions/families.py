"""Question families: each renders a grounded (context, question, answer) from one statistics row.

The user turn carries a context block with the facts as of a date; the answer is one of the family's
*answer forms* (templates) filled with the sample's **facts**: the numbers exactly as the context shows
them and the labels the rules in ``finpipe.instructions.rules`` derive from those shown numbers. Every
placeholder of a form is a declared ``Slot`` (what kind of value, which statistic, whose), so the same
forms that write an answer also parse one back (``finpipe.instructions.answers``): that is how
evaluation scores numbers per field and per ticker, and how serving verifies a generated answer.

The context states every fact an answer needs, **labels included**: the documented rules
(``finpipe.instructions.rules``) turn the shown numbers into labels here, in code, and the context lists
them beside their evidence ("- risk level: low"), in the order the answer states them. The model's job is
to pick the facts the question asks for and state them exactly; threshold arithmetic is not what a 135M
model learns in minutes on a CPU (measured: after 2.5 minutes of training it named the right label 12% of
the time when it had to compute it), and a grounded assistant should not guess what code can decide.

Several question phrasings per family (the caller's random generator picks them, so a seed fixes the
dataset) and one reference answer: the family's first applicable answer form. The other forms stay valid
answers (the parser and the scorer read them) but training teaches one, so the target is deterministic.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Callable, Iterable

from finpipe.instructions import rules as r
from finpipe.instructions.samples import CONTEXT_HEADER
from finpipe.statistics.measures import RETURN_WINDOWS

#: the N of "N-day return" the performance and comparison families choose from
WINDOWS: tuple[int, ...] = tuple(RETURN_WINDOWS[1:])

# ----------------------------------------------------------------------------------------------- slots and forms

#: slot kinds whose value is a number (compared by value, sign included)
NUMERIC_KINDS = ("price", "signed_pct", "pct", "rsi", "volume", "gap")


@dataclass(frozen=True)
class Slot:
    """One placeholder of an answer form.

    ``kind``: ticker, date, window, side (above/below), label, or a numeric kind (``NUMERIC_KINDS``).
    ``field``: the fact a numeric or label slot states, e.g. ``close`` or ``ret_{n}d_pct`` (``{n}`` is the
    sample's window). ``entity``: the placeholder naming whose fact it is (``t`` for single-ticker families;
    ``w``/``l`` for the winner/loser of a comparison; ``a,b`` for both; empty for a pair-level fact such as
    the gap). ``sign``: for a magnitude (``pct``), where its sign comes from: ``+``/``-`` fixed by the
    form's words ("12.34% below its 52-week high"), or the placeholder of a side slot ("1.2% {s20} ...").
    """

    kind: str
    field: str = ""
    entity: str = "t"
    sign: str = ""

    @property
    def numeric(self) -> bool:
        return self.kind in NUMERIC_KINDS


TICKER, SIDE = Slot("ticker", entity=""), Slot("side", entity="")
DATE, WINDOW = Slot("date", "date", entity=""), Slot("window", "window", entity="")


@dataclass(frozen=True)
class AnswerForms:
    """A family's answer templates and the meaning of their placeholders."""

    templates: tuple[str, ...]
    slots: dict[str, Slot]
    #: label slot -> its vocabulary (an answer must state exactly one of them)
    vocabularies: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: one ticker per sample (its facts are that ticker's) or a pair (each fact names its ticker)
    single: bool = True

    def applicable(self, facts: dict[str, str]) -> tuple[str, ...]:
        """The templates every placeholder of which the facts fill (a tie comparison has its own form)."""
        return tuple(t for t in self.templates if set(placeholders(t)) <= facts.keys())

    def renderings(self, facts: dict[str, str]) -> tuple[str, ...]:
        """Every correct answer for these facts: each applicable form, filled."""
        return tuple(t.format(**facts) for t in self.applicable(facts))


@dataclass
class Rendered:
    context: list[tuple[str, str]]  # (label, value) lines of the context block
    question: str
    answer: str
    expected: dict[str, float]  # the numbers every correct answer states, by fact key
    labels: dict[str, str]
    facts: dict[str, str] = field(default_factory=dict)  # every slot's value, as written


def context_block(title: str, as_of: str, lines: list[tuple[str, str]]) -> str:
    body = "\n".join(f"- {label}: {value}" for label, value in lines)
    return f"{CONTEXT_HEADER} for {title} as of {as_of}:\n{body}"


def display_name(row: dict) -> str:
    return f"{row['ticker']} ({row['name']})" if row.get("name") and row["name"] != row["ticker"] else row["ticker"]


def shown(text: str) -> float:
    """A number as the context shows it, back to a float: '+1.23%' -> 0.0123, '1,234' -> 1234.0."""
    cleaned = text.replace(",", "").rstrip("%")
    value = float(cleaned)
    return value / 100 if text.endswith("%") else value


def with_move(ret: str) -> str:
    """A return as the context shows it, with the move label the rules give it: '+1.23% (gained)'."""
    return f"{ret} ({r.move_label(shown(ret))})"


def value_of(text: str) -> Decimal | None:
    """A number as written, exactly, in its displayed unit: '1,234.50' -> 1234.50, '+1.23%' -> 1.23; None if
    the text is no number."""
    try:
        value = Decimal(text.replace(",", "").rstrip("%"))
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


#: (ticker, field) — the ticker is "" for a fact of the pair (the gap) or of the sample (date, window)
FactKey = tuple[str, str]


def slot_entities(slot: Slot, facts: dict[str, str], single: bool = True) -> list[str]:
    """Whose fact a slot states: the sample's ticker in a single-ticker family, else its entity placeholders'."""
    if not slot.entity:
        return [""]
    if single:
        return [facts.get("t", "")]
    return [facts[e] for e in slot.entity.split(",") if e in facts]


def slot_field(slot: Slot, window: str) -> str:
    return slot.field.format(n=window) if "{n}" in slot.field else slot.field


def signed_decimal(slot: Slot, text: str, side: str | None) -> Decimal | None:
    """A numeric slot's value with its sign: a magnitude takes it from its form's words (``slot.sign`` is + or -)
    or from its side slot's word (``side``: above / below; None when unknown)."""
    value = value_of(text)
    if value is None or slot.kind != "pct" or not slot.sign:
        return value
    if slot.sign in "+-":
        return -abs(value) if slot.sign == "-" else abs(value)
    if side is None:
        return None
    return -abs(value) if side.lower() == "below" else abs(value)


def typed_fact_values(forms: AnswerForms, facts: dict[str, str]) -> dict[FactKey, tuple[Decimal | str, Slot]]:
    """Every fact the sample's slots hold, with the slot that states it: numbers (signed, in displayed units),
    dates and windows as text."""
    out: dict[FactKey, tuple[Decimal | str, Slot]] = {}
    for name, text in facts.items():
        slot = forms.slots.get(name)
        if slot is None or slot.kind in ("ticker", "side", "label"):
            continue
        value = signed_decimal(slot, text, facts.get(slot.sign)) if slot.numeric else text
        for who in slot_entities(slot, facts, forms.single):
            out[(who, slot_field(slot, facts.get("n", "")))] = (value, slot)
    return out


def fact_values(forms: AnswerForms, facts: dict[str, str]) -> dict[FactKey, Decimal | str]:
    """Every fact the sample's slots hold: numbers (signed, in displayed units), dates and windows as text."""
    return {key: value for key, (value, _) in typed_fact_values(forms, facts).items()}


def required_keys(forms: AnswerForms, facts: dict[str, str]) -> list[FactKey]:
    """The numeric facts every applicable answer form states: what a correct answer must say."""
    per_template = [set(placeholders(t)) for t in forms.applicable(facts)]
    common = set.intersection(*per_template) if per_template else set()
    keys: list[FactKey] = []
    for name in sorted(common):
        slot = forms.slots[name]
        if slot.numeric:
            keys += [(who, slot_field(slot, facts.get("n", ""))) for who in slot_entities(slot, facts, forms.single)]
    return sorted(set(keys))


def required_numbers(forms: AnswerForms, facts: dict[str, str]) -> dict[str, float]:
    """``Sample.expected``: the required facts as floats, keyed by field (``TICKER_field`` in a pair)."""
    values = fact_values(forms, facts)
    return {(field_name if forms.single or not who else f"{who}_{field_name}"): float(values[(who, field_name)])
            for who, field_name in required_keys(forms, facts)}


def placeholders(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


# ----------------------------------------------------------------------------------------------- the families

PRICE = AnswerForms(
    templates=(
        "{t} opened at {open} on {d}, traded between {low} and {high}, and closed at {close} ({ret} on the day). "
        "Volume was {volume} shares.",
        "{t} closed at {close} on {d}, after opening at {open}. The session ranged from {low} to {high} "
        "on {volume} shares, a 1-day move of {ret}.",
    ),
    slots={"t": TICKER, "d": DATE, "open": Slot("price", "open"), "high": Slot("price", "high"),
           "low": Slot("price", "low"), "close": Slot("price", "close"), "volume": Slot("volume", "volume"),
           "ret": Slot("signed_pct", "daily_return_pct")},
)
PRICE_QUESTIONS = (
    "What was {t}'s latest closing price, and how did the session trade?",
    "Give me {t}'s last session: open, high, low, close and volume.",
    "How did {t} trade in its most recent session?",
    "Where did {t} close, and what was its trading range that day?",
)


def price(row: dict, rng: random.Random) -> Rendered:
    t = row["ticker"]
    facts = {"t": t, "d": row["as_of"], "open": r.price(row["open"]), "high": r.price(row["high"]),
             "low": r.price(row["low"]), "close": r.price(row["close"]), "volume": r.volume(row["volume"]),
             "ret": r.pct(row["daily_return"])}
    ctx = [("open", facts["open"]), ("low", facts["low"]), ("high", facts["high"]), ("close", facts["close"]),
           ("1-day return", facts["ret"]), ("volume", facts["volume"])]
    return _render(PRICE, PRICE_QUESTIONS, ctx, facts, {}, rng)


PERFORMANCE = AnswerForms(
    templates=(
        "{t} returned {ret} over the last {n} trading days, closing at {close}, so it {move}.",
        "{t}'s {n}-day return is {ret} (close {close}): it {move} over the past {n} sessions.",
    ),
    slots={"t": TICKER, "n": WINDOW, "move": Slot("label", "move"), "ret": Slot("signed_pct", "ret_{n}d_pct"),
           "close": Slot("price", "close")},
    vocabularies={"move": ("gained", "lost", "was roughly flat")},
)
PERFORMANCE_QUESTIONS = (
    "How has {t} performed over the last {n} trading days?",
    "What is {t}'s {n}-day return?",
    "Did {t} go up or down over the past {n} sessions?",
)


def performance(row: dict, rng: random.Random) -> Rendered:
    n = rng.choice(WINDOWS)
    facts = {"t": row["ticker"], "n": str(n), "ret": r.pct(row[f"ret_{n}d"]), "close": r.price(row["close"])}
    facts["move"] = r.move_label(shown(facts["ret"]))
    # the asked window first, then the close: the answer's order; the other windows follow as context
    ctx = [(f"{n}-day return", with_move(facts["ret"])), ("close", facts["close"])]
    ctx += [(f"{w}-day return", with_move(r.pct(row[f"ret_{w}d"]))) for w in RETURN_WINDOWS if w != n]
    return _render(PERFORMANCE, PERFORMANCE_QUESTIONS, ctx, facts, {"move": facts["move"]}, rng)


VOLATILITY = AnswerForms(
    templates=(
        "{t}'s annualized 20-day volatility is {volatility}, which puts its risk level at {risk}. "
        "Its worst drawdown over the last 252 days was {dd}.",
        "{t} shows an annualized 20-day volatility of {volatility} and a max drawdown over 252 days of {dd}, "
        "so its risk level is {risk}.",
    ),
    slots={"t": TICKER, "volatility": Slot("pct", "volatility_20d_pct", sign="+"), "risk": Slot("label", "risk"),
           "dd": Slot("signed_pct", "max_drawdown_252d_pct")},
    vocabularies={"risk": ("low", "medium", "high")},
)
VOLATILITY_QUESTIONS = (
    "How volatile is {t} right now?",
    "What is {t}'s risk level based on recent volatility?",
    "Is {t} a low, medium or high risk stock at the moment?",
)


def volatility(row: dict, rng: random.Random) -> Rendered:
    facts = {"t": row["ticker"], "volatility": r.pct_abs(row["volatility_20d"]), "dd": r.pct(row["max_drawdown_252d"])}
    facts["risk"] = r.risk_label(shown(facts["volatility"]))
    ctx = [("annualized 20-day volatility", facts["volatility"]), ("risk level", facts["risk"]),
           ("max drawdown over 252 days", facts["dd"]), ("1-day return", r.pct(row["daily_return"]))]
    return _render(VOLATILITY, VOLATILITY_QUESTIONS, ctx, facts, {"risk": facts["risk"]}, rng)


TREND = AnswerForms(
    templates=(
        "{t} closed at {close}, {p20} {s20} its 20-day SMA of {sma20} and {p50} {s50} its 50-day SMA of "
        "{sma50}, so the trend is {trend}.",
        "The close of {close} is {p20} {s20} the 20-day SMA ({sma20}) and {p50} {s50} the 50-day SMA ({sma50}): "
        "{t} is trending {trend}.",
    ),
    slots={"t": TICKER, "trend": Slot("label", "trend"), "close": Slot("price", "close"),
           "p20": Slot("pct", "pct_vs_sma_20_pct", sign="s20"), "s20": SIDE, "sma20": Slot("price", "sma_20"),
           "p50": Slot("pct", "pct_vs_sma_50_pct", sign="s50"), "s50": SIDE, "sma50": Slot("price", "sma_50")},
    vocabularies={"trend": ("up", "down", "sideways")},
)
TREND_QUESTIONS = (
    "What is the trend for {t} relative to its moving averages?",
    "Is {t} trending up, down or sideways?",
    "Where does {t} trade versus its 20-day and 50-day moving averages?",
)


def trend(row: dict, rng: random.Random) -> Rendered:
    facts = {"t": row["ticker"], "close": r.price(row["close"]), "sma20": r.price(row["sma_20"]),
             "sma50": r.price(row["sma_50"]), "p20": r.pct_abs(row["pct_vs_sma_20"]),
             "s20": r.side(row["pct_vs_sma_20"]), "p50": r.pct_abs(row["pct_vs_sma_50"]),
             "s50": r.side(row["pct_vs_sma_50"])}
    facts["trend"] = r.trend_label(shown(facts["close"]), shown(facts["sma20"]), shown(facts["sma50"]))
    ctx = [("close", facts["close"]), ("close vs 20-day SMA", f"{facts['p20']} {facts['s20']}"),
           ("20-day SMA", facts["sma20"]), ("close vs 50-day SMA", f"{facts['p50']} {facts['s50']}"),
           ("50-day SMA", facts["sma50"]), ("trend", facts["trend"]), ("10-day SMA", r.price(row["sma_10"]))]
    return _render(TREND, TREND_QUESTIONS, ctx, facts, {"trend": facts["trend"]}, rng)


MOMENTUM = AnswerForms(
    templates=(
        "{t}'s 14-day RSI is {rsi}, so momentum reads {momentum}. Its 14-day return is {ret}.",
        "The RSI (14) for {t} stands at {rsi}, with a 14-day return of {ret}: momentum is {momentum}.",
    ),
    slots={"t": TICKER, "rsi": Slot("rsi", "rsi_14"), "momentum": Slot("label", "momentum"),
           "ret": Slot("signed_pct", "ret_14d_pct")},
    vocabularies={"momentum": ("overbought", "oversold", "neutral")},
)
MOMENTUM_QUESTIONS = (
    "Is {t} overbought or oversold?",
    "What does {t}'s RSI say about its momentum?",
    "How is {t}'s momentum according to the 14-day RSI?",
)


def momentum(row: dict, rng: random.Random) -> Rendered:
    facts = {"t": row["ticker"], "rsi": r.rsi(row["rsi_14"]), "ret": r.pct(row["ret_14d"])}
    facts["momentum"] = r.momentum_label(shown(facts["rsi"]))
    ctx = [("RSI (14)", facts["rsi"]), ("momentum", facts["momentum"]), ("14-day return", facts["ret"]),
           ("close", r.price(row["close"]))]
    return _render(MOMENTUM, MOMENTUM_QUESTIONS, ctx, facts, {"momentum": facts["momentum"]}, rng)


RANGE = AnswerForms(
    templates=(
        "{t} closed at {close}, {dh} below its 52-week high of {hi} and {dl} above its 52-week low of {lo}, "
        "so it is {range}.",
        "The close of {close} is {dh} under the 52-week high ({hi}); the 52-week low is {lo} and the max drawdown "
        "over 252 days was {dd}. {t} is {range}.",
    ),
    slots={"t": TICKER, "close": Slot("price", "close"), "dh": Slot("pct", "dist_52w_high_pct", sign="-"),
           "hi": Slot("price", "high_52w"), "dl": Slot("pct", "dist_52w_low_pct", sign="+"),
           "lo": Slot("price", "low_52w"), "range": Slot("label", "range"),
           "dd": Slot("signed_pct", "max_drawdown_252d_pct")},
    vocabularies={"range": ("near its 52-week high", "in a correction", "in a bear market")},
)
RANGE_QUESTIONS = (
    "How far is {t} from its 52-week high?",
    "Where does {t} sit within its 52-week range?",
    "Is {t} in a drawdown?",
)


def range_52w(row: dict, rng: random.Random) -> Rendered:
    facts = {"t": row["ticker"], "close": r.price(row["close"]), "dh": r.pct_abs(row["dist_52w_high"]),
             "hi": r.price(row["high_52w"]), "dl": r.pct_abs(row["dist_52w_low"]), "lo": r.price(row["low_52w"]),
             "dd": r.pct(row["max_drawdown_252d"])}
    facts["range"] = r.range_label(-shown(facts["dh"]))
    ctx = [("close", facts["close"]), ("distance from 52-week high", f"{facts['dh']} below"),
           ("52-week high", facts["hi"]), ("distance from 52-week low", f"{facts['dl']} above"),
           ("52-week low", facts["lo"]), ("52-week range position", facts["range"]),
           ("max drawdown over 252 days", facts["dd"])]
    return _render(RANGE, RANGE_QUESTIONS, ctx, facts, {"range": facts["range"]}, rng)


COMPARISON = AnswerForms(
    templates=(
        "{a} returned {ra} and {b} returned {rb} over the last {n} trading days, a gap of {gap} percentage points: "
        "{w} outperformed {l}.",
        "In the past {n} sessions {a} returned {ra} versus {rb} for {b}; the gap is {gap} percentage points, so {w} "
        "outperformed {l}.",
        "{a} and {b} both returned {r} over the last {n} trading days: neither outperformed.",
    ),
    slots={"a": TICKER, "b": TICKER, "w": TICKER, "l": TICKER, "n": WINDOW,
           "ra": Slot("signed_pct", "ret_{n}d_pct", entity="a"), "rb": Slot("signed_pct", "ret_{n}d_pct", entity="b"),
           "r": Slot("signed_pct", "ret_{n}d_pct", entity="a,b"), "gap": Slot("gap", "gap_pp", entity="")},
    single=False,
)
COMPARISON_QUESTIONS = (
    "Which did better over the last {n} trading days, {a} or {b}?",
    "Compare {a} and {b} over the past {n} sessions.",
    "Over {n} days, did {a} outperform {b}?",
)
#: the outperformer label: the winner's ticker, or this when both returns are equal as shown
TIE = "tie"


def comparison(a: dict, b: dict, rng: random.Random) -> Rendered:
    n = rng.choice(WINDOWS)
    ta, tb = a["ticker"], b["ticker"]
    ra, rb = r.pct(a[f"ret_{n}d"]), r.pct(b[f"ret_{n}d"])
    # decided and measured on the percentages as shown, so the result and the gap follow from the context; both
    # (a comparison and arithmetic, which a small model cannot be trusted with) are in the context
    shown_a, shown_b = round(shown(ra) * 100, 2), round(shown(rb) * 100, 2)
    gap = r.gap(abs(shown_a - shown_b))
    # what the answer states, in its order (both returns, the gap, the result), then the rest as context
    ctx = [(f"{ta} {n}-day return", ra), (f"{tb} {n}-day return", rb),
           (f"{n}-day return gap", f"{gap} percentage points")]
    facts = {"a": ta, "b": tb, "n": str(n), "gap": gap}  # a tie's gap (0.00) is a fact too, if no form states it
    if shown_a == shown_b:
        label = TIE
        facts["r"] = ra  # the tie form states the one return both share
        ctx.append(("result", "neither outperformed"))
    else:
        winner, loser = (ta, tb) if shown_a > shown_b else (tb, ta)
        facts |= {"ra": ra, "rb": rb, "w": winner, "l": loser}
        label = winner
        ctx.append(("result", f"{winner} outperformed {loser}"))
    for row in (a, b):
        ctx += [(f"{row['ticker']} close", r.price(row["close"])),
                (f"{row['ticker']} annualized 20-day volatility", r.pct_abs(row["volatility_20d"]))]
    facts["outperformer"] = label
    return _render(COMPARISON, COMPARISON_QUESTIONS, ctx, facts, {"outperformer": label}, rng)


def _render(forms: AnswerForms, questions: tuple[str, ...], ctx: list[tuple[str, str]], facts: dict[str, str],
            labels: dict[str, str], rng: random.Random) -> Rendered:
    question = rng.choice(questions).format(**facts)
    answer = forms.applicable(facts)[0].format(**facts)  # one reference form: a deterministic target
    return Rendered(ctx, question, answer, required_numbers(forms, facts), labels, facts)


SingleFamily = Callable[[dict, random.Random], Rendered]


def has_statistics(row: dict, needs: Iterable[str]) -> bool:
    """Whether the row holds every statistic a family needs, finite (a ticker's first year has no 52-week range)."""
    return all(row.get(k) is not None and math.isfinite(row[k]) for k in needs)

#: family -> (renderer, statistics it needs non-null)
SINGLE_TICKER_FAMILIES: dict[str, tuple[SingleFamily, tuple[str, ...]]] = {
    "price": (price, ("open", "high", "low", "close", "volume", "daily_return")),
    "performance": (performance, tuple(f"ret_{w}d" for w in RETURN_WINDOWS)),
    "volatility": (volatility, ("volatility_20d", "daily_return", "max_drawdown_252d")),
    "trend": (trend, ("sma_10", "sma_20", "sma_50", "pct_vs_sma_20", "pct_vs_sma_50")),
    "momentum": (momentum, ("rsi_14", "ret_14d")),
    "range": (range_52w, ("high_52w", "low_52w", "dist_52w_high", "dist_52w_low", "max_drawdown_252d")),
}
COMPARISON_NEEDS = tuple(f"ret_{w}d" for w in RETURN_WINDOWS) + ("volatility_20d",)
ALL_FAMILIES = tuple(SINGLE_TICKER_FAMILIES) + ("comparison",)

#: family -> its answer forms; the one table the parser, the scorer and the server read
FORMS: dict[str, AnswerForms] = {"price": PRICE, "performance": PERFORMANCE, "volatility": VOLATILITY,
                                 "trend": TREND, "momentum": MOMENTUM, "range": RANGE, "comparison": COMPARISON}
#: family -> the question phrasings training uses (held-out wordings live apart, in finpipe.evaluation.paraphrases)
QUESTIONS: dict[str, tuple[str, ...]] = {
    "price": PRICE_QUESTIONS, "performance": PERFORMANCE_QUESTIONS, "volatility": VOLATILITY_QUESTIONS,
    "trend": TREND_QUESTIONS, "momentum": MOMENTUM_QUESTIONS, "range": RANGE_QUESTIONS,
    "comparison": COMPARISON_QUESTIONS,
}
