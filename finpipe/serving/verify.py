"""Check a generated answer against the lake facts its question was grounded in, slot by slot.

Ground truth is the lake rows ``ground()`` read (``Grounding.rows``), rendered by the same family renderers the
training samples use, for every family and every return window: never text from the user's turn, so a client
that pastes its own "Market data for ..." block only adds question text. An answer is read back with every
family's answer forms (``finpipe.instructions.answers``) and checked like strict scoring checks it:

- a number stated in a slot ("closed at {close}", "{t}'s 14-day RSI is {rsi}") must be that field's value for
  that ticker, sign included ("2.48%" where the fact is -2.48% is wrong);
- a number no slot explains must still be one of the facts: the same value, the same sign when it carries one or
  follows a direction word ("fell 27.69%" is wrong when the only 27.69% is a volatility), the same unit
  (percent or not); numbers that are part of a horizon ("20-day", "252 days") must be horizons the data shows;
- a label must be the one the rules give ("risk level low"); the outperformer must be the winner;
- **relevance**: the answer must speak about what was asked. Each family's answer forms claim the facts they
  state; the family asked about must be among those an answer states most of (a correct price summary given
  for a 52-week-range question fails).

Omissions are not errors here (an answer may state fewer facts than a reference); false statements are, and so
is an answer that states no fact of the market data at all (nothing in it could be verified).

The verdict also lists every number and date of the answer with its character span and what its check found
(``NumberCheck``: checked against a fact, wrong, or not checkable), so a front end can mark each one in the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal

from finpipe.inference.context import Grounding, PinnedWindow
from finpipe.instructions import families as fam
from finpipe.instructions.answers import ParsedAnswer, claims, parse
from finpipe.instructions.families import FORMS, TIE, FactKey, value_of

VERIFIED, UNVERIFIED, UNGROUNDED = "verified", "unverified", "ungrounded"
#: what the check of one number found: a fact of the market data, not one, or nothing to compare it with
CHECKED, WRONG, UNCHECKED = "checked", "wrong", "unchecked"
PERCENT_KINDS = ("signed_pct", "pct")
_DOWN = re.compile(r"\b(?:fell|fall(?:en|s)?|lost|los(?:es|ing)|drop(?:ped|s)?|declin(?:ed|es)|down|slid|sank|shed"
                   r"|decreas(?:ed|es)|negative|minus|off)\W*$", re.I)
_UP = re.compile(r"\b(?:rose|ris(?:en|es)|gain(?:ed|s)?|climb(?:ed|s)?|up|add(?:ed|s)|rall(?:ied|ies)|advanc(?:ed|es)"
                 r"|jump(?:ed|s)?|increas(?:ed|es)|positive|plus)\W*$", re.I)
# a number that is part of a horizon or an indicator's name, not a value: "20-day", "252 days", "RSI (14)"
_HORIZON_AFTER = re.compile(r"^(?:-|\s)?(?:trading[- ])?(?:day|days|week|weeks|sessions?|month|months|year)\b", re.I)
NUMBER = re.compile(r"(?<![\w.,\-])[+-]?\d(?:[\d,]*\d)?(?:\.\d+)?%?")
DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True)
class NumberCheck:
    """One number (or date) of an answer, where it stands in the answer, and what its check found."""

    text: str
    span: tuple[int, int]  # character offsets in the verified answer (its text stripped)
    status: str  # CHECKED, WRONG or UNCHECKED
    fact: str | None = None  # the fact it was compared with ("AAPL close 430.47"): the one it is, or should be
    problem: str | None = None  # why it is wrong

    def as_dict(self) -> dict:
        return {"text": self.text, "start": self.span[0], "end": self.span[1], "status": self.status,
                "fact": self.fact, "problem": self.problem}


@dataclass
class Verdict:
    status: str  # verified | unverified | ungrounded (no market data to check against)
    problems: list[str] = field(default_factory=list)
    #: whether the answer speaks about what was asked (None: nothing to judge against)
    relevant: bool | None = None
    #: every number and date of the answer, in order, with its check
    numbers: list[NumberCheck] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"verdict": self.status, "problems": self.problems, "relevant": self.relevant,
                "numbers": [n.as_dict() for n in self.numbers]}

    def line(self) -> str:
        """One line for a terminal: 'verified', 'unverified: <what>' or 'ungrounded'."""
        if self.status == UNVERIFIED:
            return f"unverified: {'; '.join(self.problems[:3])}" + (" ..." if len(self.problems) > 3 else "")
        return self.status


@dataclass
class LakeTruth:
    """Every fact the lake rows behind a grounding hold, as the answer forms state them."""

    values: dict[FactKey, tuple[Decimal | str, str]] = field(default_factory=dict)  # key -> (value, slot kind)
    labels: dict[str, str] = field(default_factory=dict)  # label slot -> the rules' label (at the asked window)
    horizons: set[str] = field(default_factory=set)  # numbers that name horizons in the context ("20", "252")

    def numbers(self, percent: bool) -> list[Decimal]:
        return [v for v, kind in self.values.values() if isinstance(v, Decimal) and (kind in PERCENT_KINDS) == percent]

    def fact_with(self, percent: bool, fits) -> str | None:
        """The first numeric fact (of the unit) whose value ``fits``, in words; None when none does."""
        return next((_fact_text(key, v, kind) for key, (v, kind) in self.values.items()
                     if isinstance(v, Decimal) and (kind in PERCENT_KINDS) == percent and fits(v)), None)


def _fact_text(key: FactKey, value: Decimal | str, kind: str) -> str:
    """A fact as a person reads it: ('AAPL', 'ret_7d_pct') at -1.2 is 'AAPL ret 7d -1.20%'."""
    who, name = key
    shown = f"{value:+f}%" if kind == "signed_pct" and isinstance(value, Decimal) else \
        f"{value}%" if kind in PERCENT_KINDS else str(value)
    return " ".join(filter(None, (who, name.removesuffix("_pct").replace("_", " "), shown)))


def lake_truth(grounding: Grounding) -> LakeTruth:
    """The facts of ``grounding.rows``: each single-ticker family for each ticker (performance at every window),
    and the comparison of a pair at every window."""
    truth = LakeTruth(horizons=set(re.findall(r"\d+", re.sub(r":[^\n]*", "", grounding.context or ""))))
    rows = list(grounding.rows.values())
    for row in rows:
        for family, (render, needs) in fam.SINGLE_TICKER_FAMILIES.items():
            if not fam.has_statistics(row, needs):
                continue
            for window in fam.WINDOWS if family == "performance" else (grounding.window,):
                rendered = render(row, PinnedWindow(window))
                _add(truth, family, rendered.facts, window == grounding.window)
                if len(rows) == 1 and window == grounding.window:
                    truth.labels.update(rendered.labels)
    if len(rows) == 2 and all(fam.has_statistics(r, fam.COMPARISON_NEEDS) for r in rows):
        for window in fam.WINDOWS:
            rendered = fam.comparison(rows[0], rows[1], PinnedWindow(window))
            _add(truth, "comparison", rendered.facts, window == grounding.window)
            if window == grounding.window:
                truth.labels.update(rendered.labels)
    return truth


#: facts of a rendering that hold for its window alone without naming it (the gap, the window itself)
_WINDOW_BOUND = ("window", "gap_pp")


def _add(truth: LakeTruth, family: str, facts: dict[str, str], asked_window: bool) -> None:
    """Add a rendering's facts; one at another window than the question's adds only the facts whose field names
    their window ("ret_7d_pct")."""
    for key, (value, slot) in fam.typed_fact_values(FORMS[family], facts).items():
        if asked_window or key[1] not in _WINDOW_BOUND:
            truth.values[key] = (value, slot.kind)


def _text(value) -> str:
    return str(value)


def _signed_by_words(parsed: ParsedAnswer, answer: str) -> ParsedAnswer:
    """The parse with an unsigned return signed by the direction word before it ("fell 3.21%" states -3.21%)."""
    from dataclasses import replace

    from finpipe.instructions.families import FORMS as forms

    matches = []
    for m in parsed.matches:
        kind = forms[parsed.family].slots[m.name].kind
        if kind == "signed_pct" and not m.text.startswith(("+", "-")) and _DOWN.search(answer[max(0, m.span[0] - 24):
                                                                                             m.span[0]]):
            m = replace(m, text="-" + m.text)
        matches.append(m)
    return replace(parsed, matches=matches)


def _slot_problems(parsed: ParsedAnswer, defaults: dict[str, str], truth: LakeTruth, tickers: list[str], answer: str
                   ) -> tuple[list[str], set[tuple[int, int]]]:
    """What the answer's slot claims get wrong, and the spans they explain (``answer``: its text, for the direction
    words that sign an unsigned return)."""
    problems: list[str] = []
    said = claims(_signed_by_words(parsed, answer), defaults)
    for (who, field_name), values in said.stated.items():
        name = f"{who} {field_name}" if who else field_name
        if who and who not in tickers:
            problems.append(f"{name}: a number for {who}, which the question is not about")
        elif (who, field_name) not in truth.values:
            problems.append(f"{name}: stated {', '.join(sorted(map(_text, values)))}, which the market data does "
                            "not show")
        elif values != {truth.values[(who, field_name)][0]}:
            problems.append(f"{name}: stated {', '.join(sorted(map(_text, values)))}, fact "
                            f"{_text(truth.values[(who, field_name)][0])}")
    return problems, {m.span for m in parsed.matches}


def _slot_checks(parsed: ParsedAnswer, defaults: dict[str, str], truth: LakeTruth, tickers: list[str], answer: str
                 ) -> list[tuple[tuple[int, int], str, str | None, str | None]]:
    """Each value a slot reads, checked on its own as ``_slot_problems`` checks them per field: (span, status,
    fact, problem). A value its window cannot tie to a ticker or a field is not checkable."""
    from dataclasses import replace

    signed = _signed_by_words(parsed, answer)
    out = []
    for m in signed.matches:
        said = claims(replace(signed, matches=[m], unattributed=[]), defaults).stated
        status, fact, problem = (CHECKED, None, None) if said else (UNCHECKED, None, None)
        for (who, field_name), values in said.items():
            value, known = next(iter(values)), truth.values.get((who, field_name))
            fact = fact or (_fact_text((who, field_name), *known) if known else None)
            if who and who not in tickers:
                status, problem = WRONG, f"a number for {who}, which the question is not about"
            elif known is None:
                status, problem = WRONG, f"{who} {field_name}: the market data does not show it".strip()
            elif value != known[0]:
                status, problem = WRONG, f"the market data says {_text(known[0])}"
        out.append((m.span, status, fact, problem))
    return out


def _loose_problem(answer: str, match: re.Match, truth: LakeTruth, as_of: str | None) -> str | None:
    """Why a number no slot explains is not a fact of the market data (None: it is one)."""
    return _loose_check(answer, match, truth)[0]


def _loose_check(answer: str, match: re.Match, truth: LakeTruth) -> tuple[str | None, str | None]:
    """(why a number no slot explains is not a fact of the market data (None: it is one), the fact it is)."""
    text = match.group(0)
    after = answer[match.end():match.end() + 24]
    before = answer[max(0, match.start() - 24):match.start()]
    bare = text.lstrip("+-").rstrip("%")
    if not text.endswith("%") and (_HORIZON_AFTER.match(after) or before.rstrip().endswith("(")):
        return (None, f"a horizon of the market data ({bare})") if bare in truth.horizons else \
            (f"{text}: a horizon the market data does not show", None)
    value = value_of(bare)
    if value is None:
        return f"{text}: not a number of the market data", None
    if text.startswith(("+", "-")):
        signed = -value if text.startswith("-") else value
        fits, problem = (lambda c: c == signed), f"{text}: no fact of the market data has this value and sign"
    elif _DOWN.search(before):
        fits = lambda c: c == -value
        problem = f"{text}: stated as a fall, but no falling fact of the market data has this value"
    elif _UP.search(before):
        fits = lambda c: c == value and c > 0
        problem = f"{text}: stated as a rise, but no rising fact of the market data has this value"
    else:
        fits, problem = (lambda c: abs(c) == value), f"{text}: not in the market data (no fact has this value)"
    fact = truth.fact_with(text.endswith("%"), fits)
    return (None, fact) if fact else (problem, None)


def _number_checks(answer: str, slots: list[tuple[tuple[int, int], str, str | None, str | None]], truth: LakeTruth,
                   as_of: str | None) -> list[NumberCheck]:
    """Every number and date of the answer with its check: a slot's (wrong when any slot reading it is wrong), a
    date's (the data's date or not), or the check of a number no slot explains."""
    out = [NumberCheck(d.group(0), d.span(), CHECKED, as_of) if d.group(0) == as_of else
           NumberCheck(d.group(0), d.span(), WRONG, as_of, f"not the date of the market data ({as_of})")
           for d in DATE.finditer(answer)]
    dates = [n.span for n in out]
    for match in NUMBER.finditer(answer):
        span = match.span()
        if any(s <= span[0] and span[1] <= e for s, e in dates):
            continue
        reads = [r for r in slots if r[0][0] <= span[0] and span[1] <= r[0][1]]
        if reads:
            _, status, fact, problem = next((r for r in reads if r[1] == WRONG), None) or \
                next((r for r in reads if r[1] == CHECKED), reads[0])
        else:
            problem, fact = _loose_check(answer, match, truth)
            status = WRONG if problem else CHECKED
        out.append(NumberCheck(match.group(0), span, status, fact, problem))
    return sorted(out, key=lambda n: n.span)


def _family_weight(parsed: ParsedAnswer) -> int:
    """How much of an answer a family's forms claim: its slot values and its labels."""
    return len({m.name for m in parsed.matches}) + sum(1 for v in parsed.labels.values() if v)


def verify(answer: str, grounding: Grounding) -> Verdict:
    """The verdict on ``answer`` given the facts ``grounding`` was built from."""
    if not grounding.context or not grounding.rows:
        return Verdict(UNGROUNDED, ["no market data in the prompt: nothing to check the answer against"],
                       numbers=[NumberCheck(m.group(0), m.span(), UNCHECKED) for m in NUMBER.finditer(answer)])
    truth = lake_truth(grounding)
    tickers = list(grounding.rows)
    problems: list[str] = []
    explained: set[tuple[int, int]] = set()
    slot_checks: list[tuple[tuple[int, int], str, str | None, str | None]] = []
    weights: dict[str, int] = {}
    parsed_by_family: dict[str, ParsedAnswer] = {}
    for family in FORMS:
        if family == "comparison" and len(tickers) < 2:
            continue
        parsed = parse(family, answer)
        if family not in grounding.checks:
            # another family's forms read only what their words pin down on both sides: their one-sided windows
            # ("{close}, so it") would claim the asked family's numbers for their own fields
            parsed.matches = [m for m in parsed.matches if m.both_sides]
        parsed_by_family[family] = parsed
        weights[family] = _family_weight(parsed)
        defaults = grounding.checks.get(family, ({"t": tickers[0], "n": str(grounding.window)}, {}))[0]
        found, spans = _slot_problems(parsed, defaults, truth, tickers, answer)
        problems += found
        explained |= spans
        slot_checks += _slot_checks(parsed, defaults, truth, tickers, answer)

    # labels: of the families asked about and of the family the answer speaks about
    asked = [f for f in grounding.families if f in parsed_by_family]
    strongest = max(weights.values(), default=0)
    speaking = [f for f, w in weights.items() if w == strongest and w > 0]
    for family in dict.fromkeys(asked + speaking):
        parsed = parsed_by_family[family]
        for slot, named in parsed.labels.items():
            if not named:
                continue
            expected = truth.labels.get(slot)
            if slot == "outperformer":
                expected = truth.labels.get("outperformer")
            if expected is None:
                continue
            if [n.lower() for n in named] != [expected.lower()]:
                shown = " and ".join(repr(n) for n in named)
                problems.append(f"{slot}: names {shown}, the rules say {expected!r}" if expected != TIE or
                                slot != "outperformer" else f"{slot}: names {shown}, but neither outperformed")

    # numbers no slot explains: each must still be a fact (value, sign, unit); dates must be the data's
    dates = [d.span() for d in DATE.finditer(answer)]
    for d in DATE.finditer(answer):
        if d.group(0) != grounding.as_of:
            problems.append(f"{d.group(0)}: not the date of the market data ({grounding.as_of})")
    for match in NUMBER.finditer(answer):
        span = match.span()
        if any(s <= span[0] and span[1] <= e for s, e in [*explained, *dates]):
            continue
        problem = _loose_problem(answer, match, truth, grounding.as_of)
        if problem:
            problems.append(problem)

    relevant = None
    if grounding.families:
        relevant = strongest > 0 and any(weights.get(f, 0) == strongest for f in grounding.families)
        if not relevant and strongest > 0:
            problems.append(f"off the question: it asks about {' / '.join(grounding.families)}, the answer speaks "
                            f"about {' / '.join(speaking)}")
    if strongest == 0:
        relevant = False
        problems.append("the answer states none of the market data's facts" if not any(NUMBER.finditer(answer))
                        else "the answer states its numbers in no form finpipe can check against the question asked")
    return Verdict(UNVERIFIED if problems else VERIFIED, list(dict.fromkeys(problems)), relevant,
                   _number_checks(answer, slot_checks, truth, grounding.as_of))


def grounding_as_dict(grounding: Grounding) -> dict:
    """The grounding as an answer carries it (``finpipe.grounding``): tickers, families, the data's date and the
    notes, and the context the model was given, whole and as its (label, value) lines, for a front end to show
    beside the answer."""
    lines = [line[2:].split(": ", 1) for line in (grounding.context or "").splitlines() if line.startswith("- ")]
    return {"tickers": grounding.tickers, "family": grounding.family, "families": list(grounding.families),
            "as_of": grounding.as_of, "notes": grounding.notes, "context": grounding.context,
            "lines": [pair for pair in lines if len(pair) == 2]}
