"""Question families: each renders a grounded (context, question, answer) from one statistics row.

The user turn carries a context block with the facts as of a date; the answer states numbers copied
from it and labels derived by the rules in ``finpipe.instructions.rules``. Several phrasings per family;
the caller's random generator picks one, so a seed fixes the dataset.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from finpipe.instructions import rules as r
from finpipe.instructions.samples import CONTEXT_HEADER
from finpipe.statistics.definitions import RETURN_WINDOWS


@dataclass
class Rendered:
    context: list[tuple[str, str]]  # (label, value) lines of the context block
    question: str
    answer: str
    expected: dict[str, float]
    labels: dict[str, str]


def context_block(title: str, as_of: str, lines: list[tuple[str, str]]) -> str:
    body = "\n".join(f"- {label}: {value}" for label, value in lines)
    return f"{CONTEXT_HEADER} for {title} as of {as_of}:\n{body}"


def _name(row: dict) -> str:
    return f"{row['ticker']} ({row['name']})" if row.get("name") and row["name"] != row["ticker"] else row["ticker"]


def price(row: dict, rng: random.Random) -> Rendered:
    t = row["ticker"]
    ctx = [("open", r.price(row["open"])), ("high", r.price(row["high"])), ("low", r.price(row["low"])),
           ("close", r.price(row["close"])), ("volume", r.volume(row["volume"])),
           ("1-day return", r.pct(row["daily_return"]))]
    question = rng.choice([
        f"What was {t}'s latest closing price, and how did the session trade?",
        f"Give me {t}'s last session: open, high, low, close and volume.",
        f"How did {t} trade in its most recent session?",
        f"Where did {t} close, and what was its trading range that day?",
    ])
    answer = rng.choice([
        "{t} closed at {close} on {d}, after opening at {open}. The session ranged from {low} to {high} "
        "on {vol} shares, a 1-day move of {ret}.",
        "On {d}, {t} opened at {open}, traded between {low} and {high}, and closed at {close} ({ret} on the day). "
        "Volume was {vol} shares.",
    ]).format(t=t, d=row["as_of"], open=r.price(row["open"]), high=r.price(row["high"]), low=r.price(row["low"]),
              close=r.price(row["close"]), vol=r.volume(row["volume"]), ret=r.pct(row["daily_return"]))
    return Rendered(ctx, question, answer,
                    {k: round(row[k], 2) for k in ("open", "high", "low", "close")} | {"volume": float(round(row["volume"]))},
                    {})


def performance(row: dict, rng: random.Random) -> Rendered:
    t = row["ticker"]
    n = rng.choice(RETURN_WINDOWS[1:])
    ret = row[f"ret_{n}d"]
    ctx = [("close", r.price(row["close"]))] + [(f"{w}-day return", r.pct(row[f"ret_{w}d"])) for w in RETURN_WINDOWS]
    question = rng.choice([
        f"How has {t} performed over the last {n} trading days?",
        f"What is {t}'s {n}-day return?",
        f"Did {t} go up or down over the past {n} sessions?",
    ])
    move = r.move_label(ret)
    answer = rng.choice([
        "Over the last {n} trading days {t} {move}: its {n}-day return is {ret}, closing at {close}.",
        "{t} {move} over the past {n} sessions, a {n}-day return of {ret} (close {close}).",
    ]).format(t=t, n=n, move=move, ret=r.pct(ret), close=r.price(row["close"]))
    return Rendered(ctx, question, answer, {f"ret_{n}d_pct": round(ret * 100, 2), "close": round(row["close"], 2)},
                    {"move": move})


def volatility(row: dict, rng: random.Random) -> Rendered:
    t = row["ticker"]
    vol = row["volatility_20d"]
    risk = r.risk_label(vol)
    ctx = [("annualized 20-day volatility", r.pct_abs(vol)), ("1-day return", r.pct(row["daily_return"])),
           ("max drawdown over 252 days", r.pct(row["max_drawdown_252d"]))]
    question = rng.choice([
        f"How volatile is {t} right now?",
        f"What is {t}'s risk level based on recent volatility?",
        f"Is {t} a low, medium or high risk stock at the moment?",
    ])
    answer = rng.choice([
        "{t}'s annualized 20-day volatility is {vol}, which puts its risk level at {risk}. "
        "Its worst drawdown over the last 252 days was {dd}.",
        "Risk level: {risk}. {t} shows an annualized 20-day volatility of {vol}; "
        "the max drawdown over 252 days is {dd}.",
    ]).format(t=t, vol=r.pct_abs(vol), risk=risk, dd=r.pct(row["max_drawdown_252d"]))
    return Rendered(ctx, question, answer,
                    {"volatility_20d_pct": round(vol * 100, 2), "max_drawdown_252d_pct": round(row["max_drawdown_252d"] * 100, 2)},
                    {"risk": risk})


def trend(row: dict, rng: random.Random) -> Rendered:
    t = row["ticker"]
    label = r.trend_label(row["close"], row["sma_20"], row["sma_50"])
    ctx = [("close", r.price(row["close"])), ("10-day SMA", r.price(row["sma_10"])),
           ("20-day SMA", r.price(row["sma_20"])), ("50-day SMA", r.price(row["sma_50"])),
           ("close vs 20-day SMA", r.pct(row["pct_vs_sma_20"])), ("close vs 50-day SMA", r.pct(row["pct_vs_sma_50"]))]
    question = rng.choice([
        f"What is the trend for {t} relative to its moving averages?",
        f"Is {t} trending up, down or sideways?",
        f"Where does {t} trade versus its 20-day and 50-day moving averages?",
    ])
    side20 = "above" if row["pct_vs_sma_20"] >= 0 else "below"
    side50 = "above" if row["pct_vs_sma_50"] >= 0 else "below"
    answer = rng.choice([
        "The trend is {label}. {t} closed at {close}, {p20} {s20} its 20-day SMA of {sma20} and {p50} {s50} "
        "its 50-day SMA of {sma50}.",
        "{t} is in a{n} {label} trend: the close of {close} is {p20} {s20} the 20-day SMA ({sma20}) and {p50} "
        "{s50} the 50-day SMA ({sma50}).",
    ]).format(t=t, label=label, n="n" if label == "up" else "", close=r.price(row["close"]),
              p20=r.pct_abs(row["pct_vs_sma_20"]), s20=side20, sma20=r.price(row["sma_20"]),
              p50=r.pct_abs(row["pct_vs_sma_50"]), s50=side50, sma50=r.price(row["sma_50"]))
    return Rendered(ctx, question, answer,
                    {"close": round(row["close"], 2), "sma_20": round(row["sma_20"], 2), "sma_50": round(row["sma_50"], 2)},
                    {"trend": label})


def momentum(row: dict, rng: random.Random) -> Rendered:
    t = row["ticker"]
    label = r.momentum_label(row["rsi_14"])
    ctx = [("close", r.price(row["close"])), ("RSI (14)", r.rsi(row["rsi_14"])),
           ("14-day return", r.pct(row["ret_14d"]))]
    question = rng.choice([
        f"Is {t} overbought or oversold?",
        f"What does {t}'s RSI say about its momentum?",
        f"How is {t}'s momentum according to the 14-day RSI?",
    ])
    answer = rng.choice([
        "{t}'s 14-day RSI is {rsi}, so momentum reads {label}. Its 14-day return is {ret}.",
        "Momentum: {label}. The RSI (14) for {t} stands at {rsi}, with a 14-day return of {ret}.",
    ]).format(t=t, rsi=r.rsi(row["rsi_14"]), label=label, ret=r.pct(row["ret_14d"]))
    return Rendered(ctx, question, answer, {"rsi_14": round(row["rsi_14"], 1)}, {"momentum": label})


def range_52w(row: dict, rng: random.Random) -> Rendered:
    t = row["ticker"]
    label = r.range_label(row["dist_52w_high"])
    ctx = [("close", r.price(row["close"])), ("52-week high", r.price(row["high_52w"])),
           ("52-week low", r.price(row["low_52w"])), ("distance from 52-week high", r.pct(row["dist_52w_high"])),
           ("distance from 52-week low", r.pct(row["dist_52w_low"])),
           ("max drawdown over 252 days", r.pct(row["max_drawdown_252d"]))]
    question = rng.choice([
        f"How far is {t} from its 52-week high?",
        f"Where does {t} sit within its 52-week range?",
        f"Is {t} in a drawdown?",
    ])
    answer = rng.choice([
        "{t} closed at {close}, {dh} below its 52-week high of {hi} and {dl} above its 52-week low of {lo}, "
        "so it is {label}.",
        "{t} is {label}: the close of {close} is {dh} under the 52-week high ({hi}); the 52-week low is {lo}. "
        "The max drawdown over 252 days was {dd}.",
    ]).format(t=t, close=r.price(row["close"]), dh=r.pct_abs(row["dist_52w_high"]), hi=r.price(row["high_52w"]),
              dl=r.pct_abs(row["dist_52w_low"]), lo=r.price(row["low_52w"]), label=label,
              dd=r.pct(row["max_drawdown_252d"]))
    return Rendered(ctx, question, answer,
                    {"high_52w": round(row["high_52w"], 2), "dist_52w_high_pct": round(row["dist_52w_high"] * 100, 2)},
                    {"range": label})


def comparison(a: dict, b: dict, rng: random.Random) -> Rendered:
    n = rng.choice(RETURN_WINDOWS[1:])
    ra, rb = a[f"ret_{n}d"], b[f"ret_{n}d"]
    ctx = []
    for row in (a, b):
        ctx += [(f"{row['ticker']} close", r.price(row["close"])),
                (f"{row['ticker']} {n}-day return", r.pct(row[f"ret_{n}d"])),
                (f"{row['ticker']} annualized 20-day volatility", r.pct_abs(row["volatility_20d"]))]
    ta, tb = a["ticker"], b["ticker"]
    question = rng.choice([
        f"Which did better over the last {n} trading days, {ta} or {tb}?",
        f"Compare {ta} and {tb} over the past {n} sessions.",
        f"Over {n} days, did {ta} outperform {tb}?",
    ])
    # the gap is computed from the percentages as displayed, so it is exactly derivable from the context
    shown_a, shown_b = round(ra * 100, 2), round(rb * 100, 2)
    gap = round(abs(shown_a - shown_b), 2)
    if shown_a == shown_b:
        answer = "{a} and {b} both returned {r} over the last {n} trading days: neither outperformed.".format(
            a=ta, b=tb, r=r.pct(ra), n=n)
        return Rendered(ctx, question, answer, {f"{ta}_ret_{n}d_pct": shown_a, f"{tb}_ret_{n}d_pct": shown_b},
                        {"outperformer": "tie"})
    winner, loser = (a, b) if shown_a > shown_b else (b, a)
    answer = rng.choice([
        "{w} outperformed {l} over the last {n} trading days: {w} returned {rw} versus {rl} for {l}, "
        "a gap of {gap:.2f} percentage points.",
        "Over {n} sessions {w} returned {rw} and {l} returned {rl}, so {w} outperformed by {gap:.2f} percentage points.",
    ]).format(w=winner["ticker"], l=loser["ticker"], n=n, rw=r.pct(winner[f"ret_{n}d"]),
              rl=r.pct(loser[f"ret_{n}d"]), gap=gap)
    return Rendered(ctx, question, answer,
                    {f"{ta}_ret_{n}d_pct": shown_a, f"{tb}_ret_{n}d_pct": shown_b, "gap_pp": gap},
                    {"outperformer": winner["ticker"]})


SingleFamily = Callable[[dict, random.Random], Rendered]

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
