"""Held-out question wordings: phrasings the dataset builder never uses, for the golden set.

Kept apart from ``finpipe.instructions.families`` on purpose: nothing that builds training data imports
this module (a test guards it), so a golden question asked in one of these wordings measures whether the
model understood the question, not whether it recalls a template. Placeholders are the family's facts:
``{t}`` the ticker, ``{n}`` the window, ``{a}``/``{b}`` the compared pair.
"""

from __future__ import annotations

HELD_OUT_QUESTIONS: dict[str, tuple[str, ...]] = {
    "price": (
        "Summarize {t}'s latest trading day for me.",
        "Can you recap the most recent session for {t}?",
        "Tell me about {t}'s price action in the latest session.",
        "What did {t} do on its last trading day?",
    ),
    "performance": (
        "What return did {t} deliver over the past {n} trading sessions?",
        "Over a {n}-day horizon, how did {t} fare?",
        "Has {t} been rising or falling across the last {n} days?",
        "Show me {t}'s performance for the latest {n} sessions.",
    ),
    "volatility": (
        "How risky is {t} at present?",
        "Give me a read on {t}'s recent volatility.",
        "What risk bucket does {t} fall into today?",
        "Is {t} calm or turbulent lately?",
    ),
    "trend": (
        "Which way is {t} heading compared with its 20- and 50-day averages?",
        "Describe {t}'s trend using its moving averages.",
        "Is {t} above or below its moving averages?",
        "What direction is {t} moving in?",
    ),
    "momentum": (
        "Interpret the RSI of {t} for me: what does it imply?",
        "Is there strong buying or selling momentum in {t}?",
        "Read {t}'s 14-day RSI for me.",
        "Is {t} stretched to the upside or downside right now?",
    ),
    "range": (
        "How close is {t} to its high of the past year?",
        "Describe where {t} trades relative to its 52-week extremes.",
        "Is {t} near its yearly peak or in a slump?",
        "What is {t}'s position in its one-year trading range?",
    ),
    "comparison": (
        "Between {a} and {b}, which had the stronger {n}-day return?",
        "Who won over the last {n} sessions: {a} or {b}?",
        "How did {a} stack up against {b} across {n} trading days?",
        "Rank {a} versus {b} by their {n}-day performance.",
    ),
}
