"""Build the grounded instruction dataset from the statistics table, deterministically given a seed."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field

import polars as pl

from finpipe.instructions import families as fam
from finpipe.instructions.samples import SYSTEM_PROMPT, Sample, sample_id
from finpipe.settings import setting


@dataclass(frozen=True)
class DatasetSpec:
    seed: int = setting(42, "fixes phrasings, horizons and pairs: same seed, same bytes")
    date_stride: int = setting(3, "every Nth session (counted back from the newest) is an as-of date")
    families: tuple[str, ...] = setting(fam.ALL_FAMILIES, "question families to render")
    comparisons_per_date: int = setting(2, "ticker pairs compared per as-of date (at most all pairs)")
    system_prompt: str = setting(SYSTEM_PROMPT, "the system turn of every sample")

    def __post_init__(self) -> None:
        unknown = set(self.families) - set(fam.ALL_FAMILIES)
        if unknown:
            raise ValueError(f"unknown families {sorted(unknown)}; known: {', '.join(fam.ALL_FAMILIES)}")
        if not self.families:
            raise ValueError("families must not be empty")
        if self.date_stride < 1:
            raise ValueError(f"date_stride must be >= 1, got {self.date_stride}")
        if self.comparisons_per_date < 0:
            raise ValueError(f"comparisons_per_date must be >= 0, got {self.comparisons_per_date}")


def _rng(spec: DatasetSpec, *key: object) -> random.Random:
    # string seeds hash with SHA-512: stable across runs, processes and Python builds
    return random.Random("|".join(map(str, (spec.seed, *key))))


def _complete(row: dict, needs: tuple[str, ...]) -> bool:
    return all(row.get(k) is not None and math.isfinite(row[k]) for k in needs)


def _sample(spec: DatasetSpec, family: str, tickers: list[str], as_of: str, title: str, rendered: fam.Rendered) -> Sample:
    user = f"{fam.context_block(title, as_of, rendered.context)}\n\nQuestion: {rendered.question}"
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
                if _complete(row, needs):
                    rendered = render(row, _rng(spec, family, row["ticker"], as_of_text))
                    samples.append(_sample(spec, family, [row["ticker"]], as_of_text, fam.display_name(row), rendered))
        if "comparison" in spec.families and spec.comparisons_per_date:
            eligible = sorted(t for t, row in records.items() if _complete(row, fam.COMPARISON_NEEDS))
            pairs = list(itertools.combinations(eligible, 2))
            picker = _rng(spec, "comparison-pairs", as_of_text)
            for a, b in sorted(picker.sample(pairs, min(spec.comparisons_per_date, len(pairs)))):
                if picker.random() < 0.5:  # either ticker may be named first
                    a, b = b, a
                rendered = fam.comparison(records[a], records[b], _rng(spec, "comparison", a, b, as_of_text))
                samples.append(_sample(spec, "comparison", [a, b], as_of_text, f"{a} and {b}", rendered))
    return samples


@dataclass
class FamilyCounts:
    counts: dict[str, int] = field(default_factory=dict)


def family_counts(samples: list[Sample]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in samples:
        out[s.family] = out.get(s.family, 0) + 1
    return dict(sorted(out.items()))
