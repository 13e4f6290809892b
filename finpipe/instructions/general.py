"""General instructions the adapter keeps answering as the base model did: a replay set against forgetting.

Fine-tuning on finance templates alone makes a small model forget general skills, so training mixes in a share of
general prompts answered by the **base model itself** (self-distillation). Only the base's *right* answers are
replayed (``GeneralPrompt.accepted``, checked as the forgetting probe checks): replaying its greedy mistakes taught
them (the measurements: docs/evaluation.md, docs/training-sweep.md).

The prompts are generated here from small seeded templates (arithmetic, capitals, opposites, plurals, everyday
facts); they never repeat the forgetting probe's questions (``finpipe.evaluation.forgetting``, a test guards it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

VERSION = 2


@dataclass(frozen=True)
class GeneralPrompt:
    prompt: str
    #: the right answer as a regex matched on whole words (``forgetting.is_right``); None: open-ended, any
    #: complete answer is kept
    accepted: str | None
    #: an arithmetic prompt's operands: its answer may state no number but these and the result
    operands: tuple[int, ...] = ()


CAPITALS = (("Spain", "Madrid"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
            ("Brazil", "Bras[ií]lia"), ("Australia", "Canberra"), ("India", "New Delhi"), ("China", "Beijing"),
            ("Russia", "Moscow"), ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"), ("Norway", "Oslo"),
            ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
            ("Ireland", "Dublin"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Turkey", "Ankara"),
            ("Thailand", "Bangkok"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"), ("Austria", "Vienna"),
            ("Belgium", "Brussels"), ("Denmark", "Copenhagen"), ("Finland", "Helsinki"), ("Hungary", "Budapest"))
OPPOSITES = (("big", "small|little"), ("fast", "slow"), ("light", "dark|heavy"), ("happy", "sad|unhappy"),
             ("open", "closed?|shut"), ("early", "late"), ("old", "young|new"), ("full", "empty"),
             ("strong", "weak"), ("wet", "dry"), ("loud", "quiet|soft"), ("rich", "poor"))
PLURALS = (("child", "children"), ("foot", "feet"), ("tooth", "teeth"), ("goose", "geese"), ("man", "men"),
           ("woman", "women"), ("person", "people"), ("leaf", "leaves"), ("knife", "knives"), ("box", "boxes"),
           ("city", "cities"), ("wolf", "wolves"))
#: never a near neighbour of a probe question with another answer: the tiny model learns the neighbour's answer
#: (with "What is the freezing point of water in Fahrenheit? 32" replayed it answered the probe's Celsius
#: question "32 degrees"; with a dog's four legs, a spider's)
EVERYDAY = (
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("What is the main language spoken in Brazil?", "Portuguese"), ("What is the color of a ripe banana?", "yellow"),
    ("Which season comes after winter?", "spring"), ("What do you call a baby cat?", "kittens?"),
    ("How many continents are there?", "7|seven"), ("What instrument has black and white keys?", "piano"),
    ("Which animal is known for its long neck?", "giraffes?"), ("Name a fruit that is red.", None),
    ("What is the opposite of north?", "south"), ("How many sides does a triangle have?", "3|three"),
    ("Give me a synonym for 'quick'.", None), ("Write a short greeting for a colleague.", None),
    ("Summarize what a bank does in one sentence.", None), ("Explain what a noun is in one sentence.", None),
    ("What is the tallest mountain in the world?", "Mount Everest|Everest"),
    ("Which metal is liquid at room temperature?", "mercury"), ("What do cows drink?", "water"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci|da Vinci|Leonardo"),
    ("What is the currency of the United Kingdom?", "pounds?|sterling"),
)


def _arithmetic(rng: random.Random) -> GeneralPrompt:
    """Small operands, as in everyday questions: large products the base gets wrong are not a skill to keep."""
    kind = rng.choice(("+", "-", "*", "/"))
    if kind == "+":
        a, b = rng.randint(2, 40), rng.randint(2, 20)
        result, words = a + b, ("+", "plus")
    elif kind == "-":
        b = rng.randint(2, 20)
        a = b + rng.randint(1, 30)
        result, words = a - b, ("-", "minus")
    elif kind == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 10)
        result, words = a * b, ("*", "times")
    else:
        b, result = rng.randint(2, 10), rng.randint(2, 12)
        a, words = b * result, ("/", "divided by")
    return GeneralPrompt(f"What is {a} {rng.choice(words)} {b}?", str(result), (a, b))


def general_prompts(seed: int = 0, arithmetic: int = 40) -> list[GeneralPrompt]:
    """The replay prompts with their right answers: seeded arithmetic plus the fixed lists, in a stable order."""
    rng = random.Random(f"{seed}|general|{VERSION}")
    prompts: list[GeneralPrompt] = []
    while len(prompts) < arithmetic:
        item = _arithmetic(rng)
        if item.prompt not in {p.prompt for p in prompts}:
            prompts.append(item)
    prompts += [GeneralPrompt(f"What is the capital of {c}?", a) for c, a in CAPITALS]
    prompts += [GeneralPrompt(f"What is the opposite of {w}?", a) for w, a in OPPOSITES]
    prompts += [GeneralPrompt(f"What is the plural of '{w}'?", a) for w, a in PLURALS]
    prompts += [GeneralPrompt(q, a) for q, a in EVERYDAY]
    return prompts
