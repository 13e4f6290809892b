"""Build the grounded instruction dataset from the statistics table, deterministically given a seed."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import polars as pl

from finpipe.instructions import families as fam
from finpipe.instructions.phrasings import user_question
from finpipe.instructions.samples import SYSTEM_PROMPT, Sample, sample_id
from finpipe.settings import setting


@dataclass(frozen=True)
class DatasetSpec:
    seed: int = setting(42, "fixes phrasings, horizons and pairs: same seed, same bytes")
    date_stride: int = setting(3, "every Nth session (counted back from the newest) is an as-of date")
    families: tuple[str, ...] = setting(fam.ALL_FAMILIES, "question families to render")
    comparisons_per_date: int = setting(4, "ticker pairs compared per as-of date (at most all pairs; 4: as many "
                                        "comparisons as samples of each single-ticker family with four tickers)")
    user_phrasing_share: float = setting(0.4, "share of samples asked the way users type (terse, lower case, company "
                                         "names, typos: finpipe.instructions.phrasings) instead of a full sentence")
    system_prompt: str = setting(SYSTEM_PROMPT, "the system turn of every sample")

    def __post_init__(self) -> None:
        unknown = set(self.families) - set(fam.ALL_FAMILIES)
        if unknown:
            raise ValueError(f"unknown families {sorted(unknown)}; known: {', '.join(fam.ALL_FAMILIES)}")
        if not self.families:
            raise ValueError("families must not be empty")
        if self.date_stride < 1:
            raise ValueError(f"date_stride must be >= 1, got {self.date_stride}")
        if not 0 <= self.user_phrasing_share <= 1:
            raise ValueError(f"user_phrasing_share must be in [0, 1], got {self.user_phrasing_share}")
        if self.comparisons_per_date < 0:
            raise ValueError(f"comparisons_per_date must be >= 0, got {self.comparisons_per_date}")


def _rng(spec: DatasetSpec, *key: object) -> random.Random:
    # string seeds hash with SHA-512: stable across runs, processes and Python builds
    return random.Random("|".join(map(str, (spec.seed, *key))))


def _sample(spec: DatasetSpec, family: str, tickers: list[str], as_of: str, title: str, rendered: fam.Rendered,
            names: dict[str, str]) -> Sample:
    question = rendered.question
    phrasing = _rng(spec, "phrasing", family, *tickers, as_of)  # its own generator: the facts stay as rendered
    if phrasing.random() < spec.user_phrasing_share:
        question = user_question(family, rendered.facts, names, phrasing)
    user = f"{fam.context_block(title, as_of, rendered.context)}\n\nQuestion: {question}"
    messages = [
        {"role": "system", "content": spec.system_prompt},
        {"role": "user", "content": user},
        {"role": "assistant", "content": rendered.answer},
    ]
    return Sample(id=sample_id(family, tickers, as_of, messages), family=family, tickers=tickers, as_of=as_of,
                  messages=messages, expected=rendered.expected, labels=rendered.labels, facts=rendered.facts)


def build_samples(stats: pl.DataFrame, prices: pl.DataFrame, names: dict[str, str], spec: DatasetSpec) -> list[Sample]:
    """Samples for every ticker at every ``date_stride``-th session, in a stable order.

    ``stats`` is the statistics table; ``prices`` supplies open/high/low for the session family.
    """
    rows = stats.join(prices.select("ticker", "date", "open", "high", "low"), on=["ticker", "date"], how="left")
    dates = sorted(rows["date"].unique().to_list())
    chosen = set(dates[::-1][:: spec.date_stride])
    rows = rows.filter(pl.col("date").is_in(chosen)).sort("date", "ticker")

    samples: list[Sample] = []
    for (as_of,), day in rows.group_by("date", maintain_order=True):
        as_of_text = as_of.isoformat()
        records = {}
        for row in day.iter_rows(named=True):
            row = row | {"as_of": as_of_text, "name": names.get(row["ticker"], row["ticker"])}
            records[row["ticker"]] = row
            for family in spec.families:
                if family == "comparison":
                    continue
                render, needs = fam.SINGLE_TICKER_FAMILIES[family]
                if fam.has_statistics(row, needs):
                    rendered = render(row, _rng(spec, family, row["ticker"], as_of_text))
                    samples.append(_sample(spec, family, [row["ticker"]], as_of_text, fam.display_name(row), rendered,
                                           names))
        if "comparison" in spec.families and spec.comparisons_per_date:
            eligible = sorted(t for t, row in records.items() if fam.has_statistics(row, fam.COMPARISON_NEEDS))
            pairs = list(itertools.combinations(eligible, 2))
            picker = _rng(spec, "comparison-pairs", as_of_text)
            for a, b in sorted(picker.sample(pairs, min(spec.comparisons_per_date, len(pairs)))):
                if picker.random() < 0.5:  # either ticker may be named first
                    a, b = b, a
                rendered = fam.comparison(records[a], records[b], _rng(spec, "comparison", a, b, as_of_text))
                samples.append(_sample(spec, "comparison", [a, b], as_of_text, f"{a} and {b}", rendered, names))
    return samples


@dataclass
class FamilyCounts:
    counts: dict[str, int] = field(default_factory=dict)


def family_counts(samples: list[Sample]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in samples:
        out[s.family] = out.get(s.family, 0) + 1
    return dict(sorted(out.items()))
