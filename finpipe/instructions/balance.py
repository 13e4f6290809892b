"""Label balance: the rules are learned from their rare cases, so training sees each label value equally often.

Real prices are mostly calm: in two decades of the replay data, RSI reads "neutral" on 87% of the dates and
"oversold" on 3%, and a model trained on them as they come learns to say "neutral". ``balance_by_label``
resamples each family so its label values (its *strata*) are equally frequent, keeping the family's size:
strata above their share are subsampled, strata below it are repeated, at most ``max_repeat`` times each.
"""

from __future__ import annotations

import random
from typing import Sequence

from finpipe.instructions.samples import Sample


def label_stratum(sample: Sample) -> str:
    """The label value a sample teaches (a comparison: whether the first-named ticker won, or a tie)."""
    if sample.family == "comparison":
        winner = sample.labels.get("outperformer")
        return "tie" if winner == "tie" else ("first" if sample.tickers and winner == sample.tickers[0] else "second")
    return "|".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))


def balance_by_label(samples: Sequence[Sample], seed: int, max_repeat: int = 8) -> list[Sample]:
    """Each family resampled to equally frequent strata (same family size; seeded; stable order)."""
    by_family: dict[str, dict[str, list[Sample]]] = {}
    for s in samples:
        by_family.setdefault(s.family, {}).setdefault(label_stratum(s), []).append(s)
    out: list[Sample] = []
    for family in sorted(by_family):
        strata = by_family[family]
        total = sum(len(g) for g in strata.values())
        share = total // len(strata)
        rng = random.Random(f"{seed}|balance|{family}")
        for key in sorted(strata):
            group = sorted(strata[key], key=lambda s: s.id)
            target = min(share, len(group) * max_repeat)
            if target <= len(group):
                out += rng.sample(group, target)
            else:
                out += group * (target // len(group)) + rng.sample(group, target % len(group))
    return out


def strata_counts(samples: Sequence[Sample]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for s in samples:
        family = counts.setdefault(s.family, {})
        family[label_stratum(s)] = family.get(label_stratum(s), 0) + 1
    return {f: dict(sorted(c.items())) for f, c in sorted(counts.items())}
