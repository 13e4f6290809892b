"""Temporal train/validation split without look-ahead.

Validation = samples whose as-of date is after a cutoff; train = samples at or before it, minus an
optional embargo of ``embargo_days`` before the cutoff (so train facts computed over trailing windows
do not overlap the first validation days). Undated samples (external data) go to train only.
Exact duplicates (same user and assistant text) are dropped, keeping the earliest; any train sample
that shares its user or assistant text with a validation sample is dropped from train, and so is any
sample (either side) that shares text with a ``holdout`` set (the frozen golden evaluation set).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Sequence

from finpipe.instructions.samples import Sample
from finpipe.settings import setting


@dataclass(frozen=True)
class SplitSpec:
    val_fraction: float = setting(0.2, "share of the dated samples after the cutoff (the validation side)")
    cutoff: dt.date | None = setting(None, "explicit cutoff date; overrides val_fraction")
    embargo_days: int = setting(0, "calendar days before the cutoff excluded from training")

    def __post_init__(self) -> None:
        if self.cutoff is None and not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.embargo_days < 0:
            raise ValueError(f"embargo_days must be >= 0, got {self.embargo_days}")


@dataclass
class Split:
    train: list[Sample]
    val: list[Sample]
    cutoff: dt.date
    dropped: dict[str, int] = field(default_factory=dict)


def choose_cutoff(samples: list[Sample], val_fraction: float) -> dt.date:
    """The latest as-of date such that at least ``val_fraction`` of dated samples fall after it."""
    dates = sorted(dt.date.fromisoformat(s.as_of) for s in samples if s.as_of)
    if len(set(dates)) < 2:
        raise ValueError("a temporal split needs samples on at least two as-of dates")
    k = max(1, round(len(dates) * val_fraction))
    cutoff = dates[-k - 1] if k < len(dates) else dates[0]
    # all samples of the cutoff date stay in train; ensure validation is not empty
    if cutoff >= dates[-1]:
        cutoff = sorted(set(dates))[-2]
    return cutoff


def _texts(samples: Sequence[Sample]) -> set[str]:
    return {s.text_of("user") for s in samples} | {s.text_of("assistant") for s in samples}


def temporal_split(samples: list[Sample], spec: SplitSpec, holdout: Sequence[Sample] = ()) -> Split:
    dropped = {"duplicates": 0, "embargo": 0, "shared_text": 0, "holdout": 0}
    unique: list[Sample] = []
    seen: set[tuple[str, str]] = set()
    held = _texts(holdout)
    for s in sorted(samples, key=lambda s: (s.as_of or "", s.id)):
        if held and (s.text_of("user") in held or s.text_of("assistant") in held):
            dropped["holdout"] += 1
            continue
        key = (s.text_of("user"), s.text_of("assistant"))
        if key in seen:
            dropped["duplicates"] += 1
            continue
        seen.add(key)
        unique.append(s)

    cutoff = spec.cutoff or choose_cutoff(unique, spec.val_fraction)
    embargo_start = cutoff - dt.timedelta(days=spec.embargo_days)
    val = [s for s in unique if s.as_of and dt.date.fromisoformat(s.as_of) > cutoff]
    train = []
    for s in unique:
        if s.as_of and dt.date.fromisoformat(s.as_of) > cutoff:
            continue
        if s.as_of and spec.embargo_days and dt.date.fromisoformat(s.as_of) > embargo_start:
            dropped["embargo"] += 1
            continue
        train.append(s)
    val_texts = _texts(val)
    kept = [s for s in train if s.text_of("user") not in val_texts and s.text_of("assistant") not in val_texts]
    dropped["shared_text"] = len(train) - len(kept)
    if not val:
        raise ValueError(f"no sample is dated after the cutoff {cutoff}: the validation split would be empty")
    return Split(train=kept, val=val, cutoff=cutoff, dropped=dropped)


def load_as_dataset(path):
    """A split file as a Hugging Face ``datasets.Dataset`` (columns: id, family, messages, ...)."""
    import datasets

    return datasets.load_dataset("json", data_files=str(path), split="train")
