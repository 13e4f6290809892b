"""The forgetting probe: general instructions a fine-tune on finance templates must not unlearn.

A small, fixed, offline set written here (arithmetic, everyday facts, word tasks), asked without finpipe's
system prompt or market context, answered greedily, each scored right when its accepted answer appears as
a whole word. The embedded base model answers about two thirds of them (the set includes questions it gets wrong,
so that drift in either direction shows as drift, not as loss); promotion refuses an adapter that falls clearly
below the base (``finpipe.evaluation.promotion``). Training mixes in general prompts of its own
(``finpipe.instructions.general``), never these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: (question, accepted answer as a regex matched case-insensitively on whole words)
PROBE: tuple[tuple[str, str], ...] = (
    ("What is 7 + 5? Answer with the number only.", r"12"),
    ("What is 12 minus 4?", r"8|eight"),
    ("What is 10 divided by 2?", r"5|five"),
    ("What is 2 + 2?", r"4|four"),
    ("What is 9 + 6?", r"15|fifteen"),
    ("What is the capital of France?", r"Paris"),
    ("What is the capital of Japan?", r"Tokyo"),
    ("What is the capital of Italy?", r"Rome"),
    ("What is the capital of Germany?", r"Berlin"),
    ("What is the largest ocean on Earth?", r"Pacific"),
    ("Who wrote 'Romeo and Juliet'?", r"Shakespeare"),
    ("What gas do plants absorb from the air?", r"carbon dioxide|CO2"),
    ("What is the chemical symbol for gold?", r"Au"),
    ("What language is spoken in Spain?", r"Spanish"),
    ("Is the sun a star or a planet?", r"star"),
    ("What is H2O commonly called?", r"water"),
    ("What is the plural of 'mouse'?", r"mice"),
    ("What is the opposite of hot?", r"cold"),
    ("What is the opposite of up?", r"down"),
    ("Write the number seven as a digit.", r"7"),
    ("What color is the sky on a clear day?", r"blue"),
    ("How many days are in a week?", r"7|seven"),
    ("What is the boiling point of water in Celsius?", r"100(?:\.0)?"),
    # questions the base model gets wrong too: the probe is not chosen by the base model's successes, so a change
    # that is neutral on average does not look like forgetting
    ("How many legs does a spider have?", r"8|eight"),
    ("What is 3 times 3?", r"9|nine"),
    ("What is 100 + 1?", r"101"),
    ("What is the first letter of the English alphabet?", r"A"),
    ("What is the freezing point of water in Celsius?", r"0|zero"),
    ("Which animal is known as the king of the jungle?", r"lions?"),
    ("How many months are in a year?", r"12|twelve"),
    ("How many minutes are in an hour?", r"60|sixty"),
    ("Spell the word 'cat' backwards.", r"tac"),
    ("Which planet do we live on?", r"Earth"),
    ("What do bees make?", r"honey"),
    ("Translate 'thank you' into French.", r"merci"),
)
MAX_NEW_TOKENS = 40


@dataclass(frozen=True)
class ProbeAnswer:
    question: str
    answer: str
    right: bool


def find_answer(answer: str, accepted: str) -> re.Match | None:
    """Where ``answer`` first states ``accepted`` as a whole word ("12" is not in "125" nor in "1.12")."""
    return re.search(rf"(?<![\w.]){accepted}(?![\w])", answer, re.I)


def is_right(answer: str, accepted: str) -> bool:
    return find_answer(answer, accepted) is not None


def probe_chats() -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": q}] for q, _ in PROBE]


def score_probe(answers: list[str]) -> tuple[float, list[ProbeAnswer]]:
    """(share right, per-item rows) for answers given in ``PROBE`` order."""
    if len(answers) != len(PROBE):
        raise ValueError(f"the forgetting probe has {len(PROBE)} questions, got {len(answers)} answers")
    rows = [ProbeAnswer(q, a, is_right(a, accepted)) for (q, accepted), a in zip(PROBE, answers)]
    return round(sum(r.right for r in rows) / len(rows), 4), rows
