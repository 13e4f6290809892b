"""The golden set: a fixed evaluation set that does not change between nights, so nights are comparable.

It is drawn once from the first validation split and frozen in the lake; later splits never put its texts
into training (see ``temporal_split(holdout=...)``), so a model is never trained on the questions it is
compared on, however far the cutoff moves. Per family it holds ``per_family`` samples (10 by default),

- **balanced across labels**: the picks cycle through the family's label values (risk low / medium / high,
  ...), so a model that always answers the majority label cannot score well;
- in **two parts**: ``seen`` questions keep the wording they were generated with (a training phrasing), and
  ``paraphrase`` questions (``paraphrase_share`` of them) are re-asked in a held-out wording from
  ``finpipe.evaluation.paraphrases`` that training never uses; the answer and its facts are unchanged.

A golden set written by an older finpipe (another ``GOLDEN_VERSION``) is set aside as ``golden.v<N>.jsonl``
and a new one is frozen: scores of different versions are not comparable.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Sequence

from finpipe.evaluation.paraphrases import HELD_OUT_QUESTIONS
from finpipe.instructions.balance import label_stratum
from finpipe.instructions.samples import Sample, read_jsonl, sample_id, write_jsonl

# 3: contexts state the labels; one reference answer form. 4: contexts in the answer's order. 5: every reference
# answer starts with the ticker (the model dropped leading "On {date}," / "Over the last n trading days" clauses)
GOLDEN_VERSION = 5
PARAPHRASE_ORIGIN = "finpipe:paraphrase"
PARTS = ("seen", "paraphrase")


def part_of(sample: Sample) -> str:
    return "paraphrase" if sample.origin == PARAPHRASE_ORIGIN else "seen"


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


def pick_balanced(samples: Sequence[Sample], per_family: int, seed: int) -> dict[str, list[Sample]]:
    """Per family, ``per_family`` samples cycling through the label strata (seeded), in a stable order."""
    if per_family <= 0:
        raise ValueError(f"per_family must be > 0, got {per_family}")
    by_family: dict[str, dict[str, list[Sample]]] = {}
    for s in sorted(samples, key=lambda s: s.id):
        if s.facts:  # only samples strict scoring can read (finpipe's own, grounded)
            by_family.setdefault(s.family, {}).setdefault(label_stratum(s), []).append(s)
    out: dict[str, list[Sample]] = {}
    for family in sorted(by_family):
        rng = random.Random(f"{seed}|golden|{family}")
        strata = [rng.sample(group, len(group)) for _, group in sorted(by_family[family].items())]
        picked: list[Sample] = []
        while len(picked) < per_family and any(strata):
            for stratum in strata:
                if stratum and len(picked) < per_family:
                    picked.append(stratum.pop())
        out[family] = picked
    return out


def paraphrased(sample: Sample, rng: random.Random) -> Sample:
    """The same sample asked in a held-out wording: same context, same facts, same reference answer."""
    question = rng.choice(HELD_OUT_QUESTIONS[sample.family]).format(**sample.facts)
    context = sample.text_of("user").rsplit("\n\nQuestion: ", 1)[0]
    messages = [dict(m) for m in sample.messages]
    messages[1]["content"] = f"{context}\n\nQuestion: {question}"
    return Sample(id=sample_id(sample.family, sample.tickers, sample.as_of, messages), family=sample.family,
                  tickers=list(sample.tickers), as_of=sample.as_of, messages=messages, expected=dict(sample.expected),
                  labels=dict(sample.labels), origin=PARAPHRASE_ORIGIN, facts=dict(sample.facts))


def build_golden(candidates: Sequence[Sample], per_family: int, seed: int, paraphrase_share: float = 0.5) -> list[Sample]:
    if not 0 <= paraphrase_share <= 1:
        raise ValueError(f"paraphrase_share must be in [0, 1], got {paraphrase_share}")
    golden: list[Sample] = []
    for family, picked in pick_balanced(candidates, per_family, seed).items():
        rng = random.Random(f"{seed}|paraphrase|{family}")
        order = rng.sample(picked, len(picked))
        n_para = round(len(order) * paraphrase_share)
        golden += [paraphrased(s, rng) for s in order[:n_para]] + order[n_para:]
    return sorted(golden, key=lambda s: (s.family, s.as_of or "", s.id))


def golden_hash(samples: Sequence[Sample]) -> str:
    return hashlib.sha256("\n".join(s.id for s in samples).encode()).hexdigest()[:12]


def manifest_path(path: Path) -> Path:
    return path.with_suffix(".manifest.json")


def freeze_golden(candidates: Sequence[Sample], path: Path, per_family: int, seed: int,
                  paraphrase_share: float = 0.5) -> tuple[list[Sample], bool]:
    """The golden set at ``path``; created from ``candidates`` only if it does not exist yet (or was written by
    another golden version, which is moved aside). Returns (samples, created).

    Delete the file (and its manifest) to start a new, incomparable series.
    """
    if path.exists():
        manifest = json.loads(manifest_path(path).read_text()) if manifest_path(path).exists() else {}
        version = manifest.get("version", 1)
        if version == GOLDEN_VERSION:
            return read_jsonl(path), False
        path.rename(path.with_name(f"{path.stem}.v{version}{path.suffix}"))
        if manifest_path(path).exists():
            manifest_path(path).rename(path.with_name(f"{path.stem}.v{version}.manifest.json"))
    picked = build_golden(candidates, per_family, seed, paraphrase_share)
    if not picked:
        raise ValueError("cannot freeze an empty golden set: the validation split has no finpipe samples")
    write_jsonl(picked, path)
    parts = {part: sum(1 for s in picked if part_of(s) == part) for part in PARTS}
    manifest = {"version": GOLDEN_VERSION, "hash": golden_hash(picked), "samples": len(picked),
                "per_family": per_family, "seed": seed, "paraphrase_share": paraphrase_share, "parts": parts,
                "as_of_first": min((s.as_of for s in picked if s.as_of), default=None),
                "as_of_last": max((s.as_of for s in picked if s.as_of), default=None)}
    manifest_path(path).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return picked, True
