"""Strict answer scores: a wrong answer fails.

Each grounded sample carries its facts (every slot of its family's answer forms, as written); an answer is
read back with the same forms (``finpipe.instructions.answers``) and compared fact by fact:

- **number correctness** = right / (required + wrong extras). *Required*: the numbers every answer form of
  the family states (the close, the N-day return of each ticker, the gap, ...); one is right when the answer
  states it in its own slot, for the right ticker, with exactly the fact's value and sign, and states no
  other value for it. *Wrong extras*: anything else the answer asserts that is false — a fact stated with a
  wrong value, a number for a ticker the question is not about, a date or window that is not the sample's,
  and any number no slot explains that the context neither shows nor lets one derive (an invented number).
- **label correctness** = share of the sample's label slots for which the answer names exactly one label of
  the slot's vocabulary, as whole words, and it is the right one ("low" and "high" both named: wrong).
- **exact match**: after whitespace normalization, the answer is word for word one of the family's answer
  forms filled with the sample's facts (the reference is one of them).

Every score comes with the list of what was wrong, in words, so a report (or a server's verdict) can say why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finpipe.instructions.answers import claims, parse
from finpipe.instructions.factcheck import unsupported_numbers
from finpipe.instructions.families import FORMS, fact_values, required_keys


@dataclass
class StrictScore:
    number_correctness: float | None
    label_correctness: float | None
    exact_match: float | None
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"number_correctness": self.number_correctness, "label_correctness": self.label_correctness,
                "exact_match": self.exact_match, "problems": self.problems}


def normalize(text: str) -> str:
    return " ".join(text.split())


def _name(key: tuple[str, str]) -> str:
    who, field_name = key
    return f"{who} {field_name}" if who else field_name


def strict_score(family: str, facts: dict[str, str], labels: dict[str, str], context: str, answer: str) -> StrictScore:
    """Score ``answer`` against a sample's facts and labels; ``context`` is the user turn the answer was given
    (numbers it shows are not invented). A sample without facts (external data) scores None everywhere."""
    if family not in FORMS or not facts:
        return StrictScore(None, None, None)
    forms = FORMS[family]
    parsed = parse(family, answer)
    said = claims(parsed, facts)
    truth = fact_values(forms, facts)
    required = required_keys(forms, facts)
    problems: list[str] = []

    right = 0
    for key in required:
        values = said.stated.get(key, set())
        if values == {truth[key]}:
            right += 1
        elif not values:
            problems.append(f"{_name(key)}: not stated (fact {facts_text(truth[key])})")
        else:
            problems.append(f"{_name(key)}: stated {', '.join(sorted(map(facts_text, values)))}, "
                            f"fact {facts_text(truth[key])}")
    wrong_extra = 0
    known_tickers = {facts[k] for k in ("t", "a", "b") if k in facts}
    for key, values in said.stated.items():
        if key in required:
            continue
        who = key[0]
        if who and who not in known_tickers:
            wrong_extra += 1
            problems.append(f"{_name(key)}: a number for {who}, which the question is not about")
        elif key in truth:
            if values != {truth[key]}:
                wrong_extra += 1
                problems.append(f"{_name(key)}: stated {', '.join(sorted(map(facts_text, values)))}, "
                                f"fact {facts_text(truth[key])}")
        else:  # e.g. another window's return: right only if the context shows it
            said.loose += [facts_text(v) for v in values]
    for text in said.loose:
        if unsupported_numbers(text, context):
            wrong_extra += 1
            problems.append(f"{text}: a number the context neither shows nor lets one derive")
    numbers = right / (len(required) + wrong_extra) if required or wrong_extra else None

    label_scores = []
    for slot, expected in labels.items():
        named = parsed.labels.get(slot, [])
        ok = [n.lower() for n in named] == [expected.lower()]
        label_scores.append(1.0 if ok else 0.0)
        if not ok:
            problems.append(f"{slot}: names {' and '.join(repr(n) for n in named) or 'no label'}, "
                            f"the rule says {expected!r}")
    label = sum(label_scores) / len(label_scores) if label_scores else None

    exact = 1.0 if normalize(answer) in {normalize(r) for r in forms.renderings(facts)} else 0.0
    return StrictScore(None if numbers is None else round(numbers, 4), label, exact, problems)


def facts_text(value) -> str:
    return str(value)
