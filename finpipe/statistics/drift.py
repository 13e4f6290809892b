"""Drift of the market since the champion's training window: should the model be retrained?

The champion was trained on instruction samples drawn from ``price_statistics`` rows dated ``train_first ..
train_last`` (its ``model_runs`` row). The *current* period is the last ``window_sessions`` sessions after
``train_last``, the data the champion has never seen. Per feature (``FEATURES``: the daily return, the 20-day
volatility and RSI-14, pooled over tickers) the two are compared with

- the **population stability index** on ``bins`` fixed quantile bins of the reference (empty bins floored at
  ``PSI_FLOOR``): ``PSI = sum((cur - ref) * ln(cur / ref))``; and
- the two-sample **Kolmogorov–Smirnov** test (asymptotic p-value, Numerical Recipes' correction), on the
  *effective* sample sizes: a 20-day volatility or a 14-day RSI of consecutive days is nearly the same number, so
  each ticker counts one draw per ``MEMORY`` sessions (with the raw row counts, a quiet month of a simulated
  random walk gave KS p < 1e-4 for volatility and RSI).

A feature drifts when both say so (PSI above ``psi_threshold`` *and* KS p below ``ks_p_value``): PSI has no notion of
sample size and is biased upwards on a few dozen rows, so alone it fires on quiet days.

Two more signals: the **volatility regime** (the median 20-day volatility now against the training window's, a
ratio above ``volatility_ratio`` or below its inverse), and **tickers the champion never saw** (priced now, absent
from the training window). Any of the three is drift. Nothing here imports Dagster.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math

import numpy as np
import polars as pl

from finpipe.settings import non_finite, setting
from finpipe.statistics import measures

#: the statistics compared (columns of ``price_statistics``) and their memory in sessions: a rolling statistic of
#: consecutive days is one draw per ``memory`` sessions of a ticker, not one per row (``effective_rows``)
FEATURES = ("daily_return", "volatility_20d", "rsi_14")
MEMORY = {"daily_return": 1, "volatility_20d": measures.VOLATILITY_WINDOW, "rsi_14": measures.RSI_WINDOW}
#: the share given to an empty bin, so that ln(cur / ref) stays finite
PSI_FLOOR = 1e-4


@dataclasses.dataclass(frozen=True)
class DriftSpec:
    window_sessions: int = setting(20, "the current period: the last N sessions after the champion's training window")
    min_sessions: int = setting(10, "no verdict before this many sessions after the training window")
    psi_threshold: float = setting(0.25, "a feature drifts when its population stability index exceeds this "
                                         "(0.1-0.25 is a moderate shift, above 0.25 a large one) ...")
    ks_p_value: float = setting(0.01, "... and its two-sample Kolmogorov-Smirnov p-value is below this")
    bins: int = setting(10, "PSI bins: quantiles of the training window")
    volatility_ratio: float = setting(1.5, "a volatility regime change: the median 20-day volatility now over the "
                                           "training window's above this, or below its inverse")

    def __post_init__(self) -> None:
        problems = non_finite(self)
        if self.min_sessions < 1 or self.window_sessions < self.min_sessions:
            problems.append(f"need 1 <= min_sessions <= window_sessions, got {self.min_sessions}, "
                            f"{self.window_sessions}")
        if self.bins < 2:
            problems.append(f"bins must be >= 2, got {self.bins}")
        if not 0 < self.ks_p_value < 1:
            problems.append(f"ks_p_value must be in (0, 1), got {self.ks_p_value}")
        if self.psi_threshold <= 0 or self.volatility_ratio <= 1:
            problems.append("psi_threshold must be > 0 and volatility_ratio > 1")
        if problems:
            raise ValueError("; ".join(problems))


@dataclasses.dataclass(frozen=True)
class FeatureDrift:
    feature: str
    psi: float
    ks_statistic: float
    ks_p_value: float
    reference_rows: int
    current_rows: int
    drifted: bool


@dataclasses.dataclass(frozen=True)
class DriftReport:
    reference: tuple[dt.date | None, dt.date | None]  # the training window's first and last date
    current: tuple[dt.date | None, dt.date | None]  # the compared period's first and last session
    sessions: int  # sessions in the current period
    features: tuple[FeatureDrift, ...]
    volatility_ratio: float | None  # median volatility_20d now / in the training window
    new_tickers: tuple[str, ...]
    drifted: bool
    reason: str  # one readable sentence
    spec: DriftSpec

    @property
    def volatility_shift(self) -> bool:
        r, limit = self.volatility_ratio, self.spec.volatility_ratio
        return r is not None and (r > limit or r < 1 / limit)

    def scores(self) -> dict[str, float | int | str | None]:
        """Flat scores for run tags and metadata (rounded, short)."""
        out: dict[str, float | int | str | None] = {"sessions": self.sessions}
        for f in self.features:
            out[f"{f.feature}_psi"] = round(f.psi, 4)
            out[f"{f.feature}_ks_p"] = float(f"{f.ks_p_value:.3g}")
        out["volatility_ratio"] = None if self.volatility_ratio is None else round(self.volatility_ratio, 3)
        out["new_tickers"] = ",".join(self.new_tickers)
        return out


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``current`` against ``reference`` on the reference's quantile bins."""
    reference, current = _finite(reference), _finite(current)
    if reference.size == 0 or current.size == 0:
        return float("nan")
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))  # interior edges
    ref = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=edges.size + 1) / reference.size
    cur = np.bincount(np.searchsorted(edges, current, side="right"), minlength=edges.size + 1) / current.size
    ref, cur = np.maximum(ref, PSI_FLOOR), np.maximum(cur, PSI_FLOOR)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def ks_2samp(a: np.ndarray, b: np.ndarray, n_eff: float | None = None,
             m_eff: float | None = None) -> tuple[float, float]:
    """(D, p): the two-sample Kolmogorov–Smirnov statistic and its asymptotic two-sided p-value (``n_eff``, ``m_eff``:
    effective sample sizes for the p-value, when the values are not independent; default the counts)."""
    a, b = np.sort(_finite(a)), np.sort(_finite(b))
    n, m = a.size, b.size
    if n == 0 or m == 0:
        return float("nan"), float("nan")
    points = np.concatenate([a, b])
    d = float(np.max(np.abs(np.searchsorted(a, points, side="right") / n - np.searchsorted(b, points, side="right") / m)))
    n, m = min(n, n_eff or n), min(m, m_eff or m)
    en = math.sqrt(n * m / (n + m))
    lam = (en + 0.12 + 0.11 / en) * d
    if lam < 1e-3:
        return d, 1.0
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return d, float(min(max(p, 0.0), 1.0))


def effective_rows(frame: pl.DataFrame, feature: str) -> float:
    """Independent draws of ``feature`` in ``frame``: per ticker, its non-null rows over the feature's memory (at
    least one)."""
    rows = frame.filter(pl.col(feature).is_not_null() & pl.col(feature).is_not_nan()).group_by("ticker").len()["len"]
    return float(sum(max(1.0, n / MEMORY[feature]) for n in rows.to_list()))


def _finite(values) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    return x[np.isfinite(x)]


def compare(reference: pl.DataFrame, current: pl.DataFrame, spec: DriftSpec = DriftSpec()) -> DriftReport:
    """Drift of ``current`` against ``reference`` (both statistics rows: ticker, date and ``FEATURES``)."""
    features = []
    for name in FEATURES:
        ref, cur = reference[name].to_numpy(), current[name].to_numpy()
        score = psi(ref, cur, spec.bins)
        d, p = ks_2samp(ref, cur, effective_rows(reference, name), effective_rows(current, name))
        drifted = bool(np.isfinite(score) and score > spec.psi_threshold and np.isfinite(p) and p < spec.ks_p_value)
        features.append(FeatureDrift(name, score, d, p, int(_finite(ref).size), int(_finite(cur).size), drifted))
    ref_vol, cur_vol = _finite(reference["volatility_20d"].to_numpy()), _finite(current["volatility_20d"].to_numpy())
    ratio = (float(np.median(cur_vol) / np.median(ref_vol))
             if ref_vol.size and cur_vol.size and np.median(ref_vol) > 0 else None)
    new = tuple(sorted(set(current["ticker"].unique().to_list()) - set(reference["ticker"].unique().to_list())))
    window = lambda f: (f["date"].min(), f["date"].max()) if f.height else (None, None)  # noqa: E731
    report = DriftReport(reference=window(reference), current=window(current),
                         sessions=current["date"].n_unique(), features=tuple(features), volatility_ratio=ratio,
                         new_tickers=new, drifted=False, reason="", spec=spec)
    drifted = any(f.drifted for f in features) or report.volatility_shift or bool(new)
    return dataclasses.replace(report, drifted=drifted, reason=_reason(report, drifted))


def _reason(report: DriftReport, drifted: bool) -> str:
    since = f"{report.current[0]}..{report.current[1]} vs the champion's window {report.reference[0]}..{report.reference[1]}"
    ratio = "n/a" if report.volatility_ratio is None else f"{report.volatility_ratio:.2f}x"
    if not drifted:
        worst = max(report.features, key=lambda f: f.psi if np.isfinite(f.psi) else -1)
        return (f"no drift: largest PSI {worst.feature} {worst.psi:.3f}, volatility {ratio}, no new tickers "
                f"({since})")
    parts = [f"{f.feature} PSI {f.psi:.2f} (KS p {f.ks_p_value:.1g})" for f in report.features if f.drifted]
    if report.volatility_shift:
        parts.append(f"volatility regime {ratio}")
    if report.new_tickers:
        parts.append(f"new tickers {', '.join(report.new_tickers)}")
    return f"drift: {'; '.join(parts)} ({since})"  # the signals first: `finpipe runs` shows the start


def drift_since(statistics: pl.DataFrame, train_first: dt.date | None, train_last: dt.date,
                spec: DriftSpec = DriftSpec()) -> DriftReport | str:
    """The drift report of the last ``window_sessions`` sessions after ``train_last`` against the training window,
    or a sentence saying why there is no verdict yet (too few sessions since the window)."""
    after = statistics.filter(pl.col("date") > train_last)
    sessions = after["date"].unique().sort()
    if sessions.len() < spec.min_sessions:
        return (f"{sessions.len()} session(s) after the champion's training window (ends {train_last}); a drift "
                f"verdict needs {spec.min_sessions}")
    current = after.filter(pl.col("date") >= sessions[-spec.window_sessions:][0])
    reference = statistics.filter((pl.col("date") <= train_last)
                                  & (pl.col("date") >= train_first if train_first is not None else pl.lit(True)))
    if reference.height == 0:
        return f"no statistics in the champion's training window ({train_first}..{train_last})"
    return compare(reference, current, spec)
