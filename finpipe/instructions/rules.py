"""Documented rules that turn statistics into labels, and the one way numbers are written.

Labels (thresholds are inclusive where stated):
- trend:    "up" if close > SMA20 > SMA50; "down" if close < SMA20 < SMA50; otherwise "sideways".
- risk:     annualized 20-day volatility < 20% -> "low"; < 40% -> "medium"; otherwise "high".
- momentum: RSI-14 >= 70 -> "overbought"; <= 30 -> "oversold"; otherwise "neutral".
- move:     N-day return > +0.5% -> "gained"; < -0.5% -> "lost"; otherwise "was roughly flat".
- range:    distance below the 52-week high > -10% -> "near its 52-week high"; > -20% -> "in a correction";
            otherwise "in a bear market".
- compare:  the ticker with the higher N-day return "outperformed"; the gap is stated in percentage points.

Each rule is applied to the number **as the context shows it** (rounded), never to the unrounded statistic:
an RSI of 69.96 shows as "70.0" and reads overbought, so every label follows from what the model can see.
The context then shows the label too, beside its evidence (``finpipe.instructions.families``): the rules are
decided here, in code, and the model states them.

Numbers: prices with 2 decimals, percentages as percent with 2 decimals, RSI with 1 decimal, volume
as a whole number with thousands separators, a gap in percentage points with 2 decimals. Answers repeat
numbers exactly as the context shows them.
"""

from __future__ import annotations

RISK_LOW_BELOW = 0.20
RISK_MEDIUM_BELOW = 0.40
RSI_OVERBOUGHT = 70.0
RSI_OVERSOLD = 30.0
FLAT_BAND = 0.005
CORRECTION_BELOW = -0.10
BEAR_BELOW = -0.20


def trend_label(close: float, sma_20: float, sma_50: float) -> str:
    if close > sma_20 > sma_50:
        return "up"
    if close < sma_20 < sma_50:
        return "down"
    return "sideways"


def risk_label(volatility: float) -> str:
    if volatility < RISK_LOW_BELOW:
        return "low"
    if volatility < RISK_MEDIUM_BELOW:
        return "medium"
    return "high"


def momentum_label(rsi: float) -> str:
    if rsi >= RSI_OVERBOUGHT:
        return "overbought"
    if rsi <= RSI_OVERSOLD:
        return "oversold"
    return "neutral"


def move_label(ret: float) -> str:
    if ret > FLAT_BAND:
        return "gained"
    if ret < -FLAT_BAND:
        return "lost"
    return "was roughly flat"


def range_label(dist_52w_high: float) -> str:
    if dist_52w_high > CORRECTION_BELOW:
        return "near its 52-week high"
    if dist_52w_high > BEAR_BELOW:
        return "in a correction"
    return "in a bear market"


def price(x: float) -> str:
    return f"{x:.2f}"


def pct(x: float) -> str:
    """A fraction as a signed percentage: 0.0123 -> '+1.23%'."""
    return f"{x * 100:+.2f}%"


def pct_abs(x: float) -> str:
    """A magnitude in percent without sign: 0.0123 -> '1.23%'."""
    return f"{abs(x) * 100:.2f}%"


def rsi(x: float) -> str:
    return f"{x:.1f}"


def volume(x: float) -> str:
    return f"{int(round(x)):,}"


def side(x: float) -> str:
    """Where a close sits relative to a level, from ``close / level - 1``: 'above' (or at) / 'below'."""
    return "above" if x >= 0 else "below"


def gap(points: float) -> str:
    """A gap in percentage points: 1.2345 -> '1.23'."""
    return f"{points:.2f}"
