"""The golden set: a fixed evaluation set that does not change between nights, so nights are comparable.

It is drawn once from the first validation split (a few samples per family, chosen by a seed) and frozen
in the lake; later splits never put its texts into training (see ``temporal_split(holdout=...)``), so a
model is never trained on the questions it is compared on, however far the cutoff moves.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Sequence

from finpipe.instructions.samples import Sample, read_jsonl, write_jsonl


def pick_per_family(samples: Sequence[Sample], per_family: int, seed: int) -> list[Sample]:
    """Up to ``per_family`` samples of each family, chosen by ``seed``, in a stable order."""
    if per_family <= 0:
        raise ValueError(f"per_family must be > 0, got {per_family}")
    by_family: dict[str, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: s.id):
        by_family.setdefault(s.family, []).append(s)
    picked: list[Sample] = []
    for family in sorted(by_family):
        rng = random.Random(f"{seed}|{family}")
        group = by_family[family]
        picked += sorted(rng.sample(group, min(per_family, len(group))), key=lambda s: (s.as_of or "", s.id))
    return picked


def golden_hash(samples: Sequence[Sample]) -> str:
    return hashlib.sha256("\n".join(s.id for s in samples).encode()).hexdigest()[:12]


def freeze_golden(candidates: Sequence[Sample], path: Path, per_family: int, seed: int) -> tuple[list[Sample], bool]:
    """The golden set at ``path``; created from ``candidates`` only if it does not exist yet.

    Returns (samples, created). Delete the file (and its manifest) to start a new, incomparable series.
    """
    if path.exists():
        return read_jsonl(path), False
    picked = pick_per_family(candidates, per_family, seed)
    if not picked:
        raise ValueError("cannot freeze an empty golden set: the validation split has no samples")
    write_jsonl(picked, path)
    manifest = {"hash": golden_hash(picked), "samples": len(picked), "per_family": per_family, "seed": seed,
                "as_of_first": min((s.as_of for s in picked if s.as_of), default=None),
                "as_of_last": max((s.as_of for s in picked if s.as_of), default=None)}
    path.with_suffix(".manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return picked, True
