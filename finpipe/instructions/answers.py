"""Read an answer back into claims, with the family's own answer forms (``finpipe.instructions.families``).

An answer is templated, so each number is identified by the words around it in the form that wrote it:
"closed at {close} on", "{w} returned {rw} versus", "{p20} {s20} its 20-day SMA". Every placeholder of
every form becomes *windows*: the slot's value pattern with up to three words of the form's text on one or
both sides, plus its companions (the ticker it belongs to, the side word that signs it) when they stand
next to it. A number a window matches is a claim about that slot's fact, for the ticker the window names
(or the sample's ticker in a single-ticker family). A number no window explains is *unattributed*.

Claims are compared by value, sign included: "26.2" states 26.20; "+1.23%" and "-1.23%" differ.
Labels are read by vocabulary, as whole words or phrases: an answer must name exactly one label of a slot's
vocabulary ("low" inside "below" is no label; naming "low" and "high" is two).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from functools import lru_cache

from finpipe.instructions.families import FORMS, TIE, AnswerForms, FactKey, signed_decimal, slot_field

# a number is not glued to letters, digits, a decimal point or a minus on either side
_NUM_START = r"(?<![\w.,])"
_NUM_END = r"(?![\w%]|[.,\-]\d)"
VALUE_PATTERNS = {
    "ticker": r"(?<![\w^.])[A-Z0-9^][A-Z0-9^&\-]*(?:\.[A-Z0-9]+)*(?![\w^])",
    "date": r"\d{4}-\d{2}-\d{2}",
    "window": _NUM_START + r"\d{1,3}" + _NUM_END,
    "side": r"above|below",
    "price": _NUM_START + r"[+-]?\d[\d,]*(?:\.\d+)?" + _NUM_END,
    "signed_pct": r"(?<![\w.,])[+-]?\d[\d,]*(?:\.\d+)?%",
    "pct": r"(?<![\w.,+-])\d[\d,]*(?:\.\d+)?%",
    "rsi": _NUM_START + r"\d{1,3}(?:\.\d+)?" + _NUM_END,
    "volume": _NUM_START + r"\d[\d,]*" + _NUM_END,
    "gap": _NUM_START + r"\d+(?:\.\d+)?" + _NUM_END,
}
WORDS_PER_SIDE = 3
BOTH_SIDES = (("left", "right"),)
BOTH_OR_ONE_SIDE = (("left", "right"), ("left",), ("right",))
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class SlotMatch:
    """One value an answer states for one placeholder, with the companions its window read."""

    name: str
    text: str
    span: tuple[int, int]
    companions: dict[str, str] = field(default_factory=dict)
    #: read with its form's words on both sides (the most specific windows; one-sided ones are weaker evidence)
    both_sides: bool = False


@dataclass
class ParsedAnswer:
    family: str
    matches: list[SlotMatch]
    #: character spans of numbers no window explains (each with its text)
    unattributed: list[tuple[tuple[int, int], str]]
    #: label slot -> the vocabulary entries the answer names (outperformer: the tickers said to outperform)
    labels: dict[str, list[str]]

    def values(self, name: str) -> set[str]:
        return {m.text for m in self.matches if m.name == name}


@dataclass(frozen=True)
class _Window:
    slot: str
    regex: re.Pattern[str]
    both_sides: bool


def _companions(forms: AnswerForms, name: str) -> set[str]:
    slot = forms.slots[name]
    out = {e for e in slot.entity.split(",") if e}
    if slot.sign and slot.sign not in "+-":
        out.add(slot.sign)
    if "{n}" in slot.field:
        out.add("n")
    return out


def _literal(text: str) -> str:
    return re.sub(r"(\\ )+|\s+", r"\\s+", re.escape(text))


def _group(forms: AnswerForms, name: str, used: dict[str, int]) -> str:
    used[name] = used.get(name, 0) + 1
    return f"(?P<{name}__{used[name]}>{VALUE_PATTERNS[forms.slots[name].kind]})"


def _edge(words: str, keep: int, side: str) -> str:
    """The last (side 'left') or first ('right') ``keep`` whitespace-separated words of a literal, with the
    whitespace that touches the slot."""
    found = list(_WORD.finditer(words))
    if not found:
        return words if words.strip() == "" else ""
    if side == "left":
        return words[found[max(0, len(found) - keep)].start():]
    return words[: found[min(len(found), keep) - 1].end()]


@lru_cache(maxsize=None)
def windows(family: str) -> tuple[_Window, ...]:
    """Every value slot of every form of ``family``, as regexes: with the form's words on both sides, then on
    the left only and on the right only (each side: up to ``WORDS_PER_SIDE`` words and adjacent companions)."""
    forms = FORMS[family]
    out: list[_Window] = []
    for template in forms.templates:
        parts = list(string.Formatter().parse(template))
        literals = [p[0] for p in parts] + [""]  # literals[i] precedes names[i]
        names = [p[1] for p in parts] + [None]
        for i, name in enumerate(names):
            if not name or forms.slots[name].kind in ("ticker", "side", "label"):
                continue  # tickers and sides are read as companions of a value; labels by vocabulary
            companions = _companions(forms, name)
            # a window ("30") is a small integer any form's constants can share ("over the last 252 days" in the
            # volatility answer): it is read only with its form's words on both sides
            side_sets = BOTH_SIDES if forms.slots[name].kind == "window" else BOTH_OR_ONE_SIDE
            for sides in side_sets:
                used: dict[str, int] = {}
                regex, words, named = "", "", 0  # named: companions in the window (a ticker is as specific as a word)
                if "left" in sides:
                    lit = literals[i]
                    near = _edge(lit, WORDS_PER_SIDE, "left")
                    if i > 0 and names[i - 1] in companions and len(_WORD.findall(lit)) <= 1:
                        far = _edge(literals[i - 1], 2, "left")
                        regex, words = _literal(far) + _group(forms, names[i - 1], used) + _literal(lit), far + lit
                        named += 1
                    else:
                        regex, words = _literal(near), near
                core = _group(forms, name, used)
                right = ""
                if "right" in sides:
                    lit = literals[i + 1]
                    near = _edge(lit, WORDS_PER_SIDE, "right")
                    if names[i + 1] in companions and len(_WORD.findall(lit)) <= 1:
                        far = _edge(literals[i + 2], 2, "right")
                        right, words = _literal(lit) + _group(forms, names[i + 1], used) + _literal(far), \
                            words + lit + far
                        named += 1
                    else:
                        right, words = _literal(near), words + near
                if not re.search(r"[A-Za-z]{2,}", words):
                    continue  # a window of punctuation alone would attribute any number
                if len(sides) == 1 and len(re.findall(r"[A-Za-z]{2,}", words)) + named < 2:
                    # one side of one word ("is {dh}") would claim "volatility is 27.69%" for the range; one word and
                    # the ticker it belongs to ("GOOG returned {ra}") is specific
                    continue
                out.append(_Window(name, re.compile(regex + core + right), len(sides) == 2))
    return tuple(out)


NUMBER = re.compile(r"(?<![\w.,\-])[+-]?\d(?:[\d,]*\d)?(?:\.\d+)?%?")
DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse(family: str, answer: str) -> ParsedAnswer:
    """Every value the answer states for the family's slots, the numbers it states outside them, and the labels
    it names."""
    forms = FORMS[family]
    matches: dict[tuple[int, int], SlotMatch] = {}
    claimed: dict[tuple[int, int], set[str]] = {}
    for both in (True, False):
        for window in windows(family):
            if window.both_sides != both:
                continue
            for m in window.regex.finditer(answer):
                groups = {k.split("__")[0]: (v, m.span(k)) for k, v in m.groupdict().items() if v is not None}
                text, span = groups[window.slot]
                if both:
                    if span not in matches:
                        matches[span] = SlotMatch(window.slot, text, span,
                                                  {k: v for k, (v, _) in groups.items() if k != window.slot}, True)
                elif span not in matches:
                    claimed.setdefault(span, set()).add(window.slot)
                    if len(claimed[span]) == 1:
                        matches[span] = SlotMatch(window.slot, text, span,
                                                  {k: v for k, (v, _) in groups.items() if k != window.slot})
                    else:  # two slots claim the same number from one side each: it is not attributed
                        matches.pop(span, None)
    taken = [m.span for m in matches.values()]
    dates = [d.span() for d in DATE.finditer(answer)]
    unattributed = []
    for n in NUMBER.finditer(answer):
        if not _inside(n.span(), taken) and not _inside(n.span(), dates):
            unattributed.append((n.span(), n.group(0)))
    return ParsedAnswer(family, sorted(matches.values(), key=lambda m: m.span), unattributed,
                        {name: named_labels(forms, name, answer) for name in forms.vocabularies}
                        | ({"outperformer": outperformers(answer)} if family == "comparison" else {}))


def _inside(span: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    return any(s <= span[0] and span[1] <= e for s, e in spans)


def named_labels(forms: AnswerForms, slot: str, answer: str) -> list[str]:
    """The vocabulary entries of ``slot`` the answer names, as whole words or phrases, case-insensitively."""
    found = []
    for label in forms.vocabularies[slot]:
        if re.search(rf"(?<![\w-]){re.escape(label)}(?![\w-])", answer, re.I):
            found.append(label)
    return found


_OUTPERFORMED = re.compile(r"(\S+)\s+outperformed\b")


def outperformers(answer: str) -> list[str]:
    """Who the answer says outperformed: the word before each 'outperformed' ('neither' is a tie)."""
    out = []
    for m in _OUTPERFORMED.finditer(answer):
        who = m.group(1).strip(".,;:!?()\"'")
        who = TIE if who.lower() == "neither" else who
        if who not in out:
            out.append(who)
    return out


@dataclass
class Claims:
    """What an answer asserts, keyed like ``families.fact_values``: (ticker, field) -> the values stated."""

    stated: dict[FactKey, set] = field(default_factory=dict)
    #: numbers with no (ticker, field) to compare with: outside every window, or a window that names no ticker
    loose: list[str] = field(default_factory=list)


def claims(parsed: ParsedAnswer, facts: dict[str, str]) -> Claims:
    """Turn slot matches into claims: each number for the ticker its window names (the sample's ticker in a
    single-ticker family), the field with the window the answer states (else the sample's)."""
    forms = FORMS[parsed.family]
    out = Claims(loose=[text for _, text in parsed.unattributed])
    for m in parsed.matches:
        slot = forms.slots[m.name]
        window = m.companions.get("n") or facts.get("n", "")
        if not slot.entity:
            owners = [""]
        elif forms.single:
            owners = [m.companions.get("t") or facts.get("t", "")]
        elif "," in slot.entity:  # "{a} and {b} both returned {r}": both of the pair, named at the start
            owners = [m.companions.get(e) or facts.get(e) for e in slot.entity.split(",")]
        else:
            owners = [m.companions.get(slot.entity)]
        value = signed_decimal(slot, m.text, m.companions.get(slot.sign)) if slot.numeric else m.text
        if value is None or None in owners:
            out.loose.append(m.text)
            continue
        for who in owners:
            out.stated.setdefault((who, slot_field(slot, window)), set()).add(value)
    return out
