"""Check a generated answer against the facts its question was grounded in, with the rules the dataset gate and the
strict evaluation use: every number must appear in the market data or derive from it (the gate's fact check), a
number stated in a field must be that field's value for that ticker, and a label must be the one the rules give.

Omissions are not errors here (an answer may state fewer facts than a reference); false statements are, and so
is an answer that states no fact of the market data at all (nothing in it could be verified).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finpipe.evaluation.strict import strict_score
from finpipe.inference.context import Grounding
from finpipe.instructions.answers import parse
from finpipe.instructions.factcheck import numbers_in, unsupported_numbers

VERIFIED, UNVERIFIED, UNGROUNDED = "verified", "unverified", "ungrounded"


@dataclass
class Verdict:
    status: str  # verified | unverified | ungrounded (no market data to check against)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"verdict": self.status, "problems": self.problems}


def verify(answer: str, grounding: Grounding) -> Verdict:
    if not grounding.context:
        return Verdict(UNGROUNDED, ["no market data in the prompt: nothing to check the answer against"])
    problems = [f"{n}: not in the market data and not derivable from it"
                for n in unsupported_numbers(answer, grounding.context)]
    several = len(grounding.checks) > 1
    for family, (facts, labels) in grounding.checks.items():
        if several and not parse(family, answer).matches:
            continue  # a context of several families: check the families the answer speaks about
        score = strict_score(family, facts, labels, grounding.user, answer)
        problems += [p for p in score.problems
                     if "not stated" not in p and "names no label" not in p and "neither shows" not in p]
    stated_numbers, _ = numbers_in(answer)
    stated_labels = [label for family in grounding.checks for label_list in parse(family, answer).labels.values()
                     for label in label_list]
    if not stated_numbers and not stated_labels:
        problems.append("the answer states none of the market data's facts")
    return Verdict(UNVERIFIED if problems else VERIFIED, list(dict.fromkeys(problems)))
