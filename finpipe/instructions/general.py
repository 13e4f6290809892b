"""General instructions the adapter keeps answering as the base model did: a replay set against forgetting.

Fine-tuning on finance templates alone makes a small model forget general skills (measured: after 500k training
tokens the forgetting probe fell from 1.00 to 0.74; "What is 7 + 5?" -> "The answer is 7."). Training therefore
mixes in a share of general prompts answered by the **base model itself** (self-distillation: the target is the
base's own behaviour, whatever it is), so the adapter learns finance without drifting elsewhere.

The prompts are generated here from small seeded templates (arithmetic, capitals, opposites, plurals, everyday
facts); they never repeat the forgetting probe's questions (``finpipe.evaluation.forgetting``, a test guards it).
"""

from __future__ import annotations

import random

VERSION = 1
COUNTRIES = ("Spain", "Canada", "Egypt", "Kenya", "Brazil", "Australia", "India", "China", "Russia", "Mexico",
             "Argentina", "Norway", "Sweden", "Poland", "Greece", "Portugal", "Ireland", "Peru", "Chile", "Turkey",
             "Thailand", "Nigeria", "Morocco", "Austria", "Belgium", "Denmark", "Finland", "Hungary")
OPPOSITES = ("big", "fast", "light", "happy", "open", "early", "old", "full", "strong", "wet", "loud", "rich")
PLURALS = ("child", "foot", "tooth", "goose", "man", "woman", "person", "leaf", "knife", "box", "city", "wolf")
EVERYDAY = (
    "How many legs does a dog have?", "What do bees collect from flowers?", "What is the largest planet in the solar "
    "system?", "What is the main language spoken in Brazil?", "How many minutes are in two hours?",
    "What is the color of a ripe banana?", "Which season comes after winter?", "What is the freezing point of "
    "water in Fahrenheit?", "What do you call a baby cat?", "How many continents are there?",
    "What instrument has black and white keys?", "Which animal is known for its long neck?",
    "Name a fruit that is red.", "What is the opposite of north?", "How many sides does a triangle have?",
    "Give me a synonym for 'quick'.", "Write a short greeting for a colleague.", "Summarize what a bank does in "
    "one sentence.", "Explain what a noun is in one sentence.", "What is the boiling point of water in Fahrenheit?",
)


def general_prompts(seed: int = 0, arithmetic: int = 40) -> list[str]:
    """The replay prompts: seeded arithmetic plus the fixed lists, in a stable order."""
    rng = random.Random(f"{seed}|general|{VERSION}")
    prompts = []
    operations = (("+", "plus"), ("-", "minus"), ("*", "times"))
    while len(prompts) < arithmetic:
        a, b = rng.randint(2, 60), rng.randint(2, 30)
        symbol, word = rng.choice(operations)
        prompt = rng.choice([f"What is {a} {symbol} {b}?", f"What is {a} {word} {b}?"])
        if prompt not in prompts:
            prompts.append(prompt)
    prompts += [f"What is the capital of {c}?" for c in COUNTRIES]
    prompts += [f"What is the opposite of {w}?" for w in OPPOSITES]
    prompts += [f"What is the plural of '{w}'?" for w in PLURALS]
    prompts += list(EVERYDAY)
    return prompts
