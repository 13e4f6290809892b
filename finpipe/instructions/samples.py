"""The chat sample record, its stable id, and JSONL (de)serialization."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

SYSTEM_PROMPT = (
    "You are finpipe, a financial data assistant. Answer only from the market data given in the "
    "question, repeat numbers exactly as given, and keep answers short. This is not investment advice."
)
CONTEXT_HEADER = "Market data"

GROUNDED_FAMILIES = ("price", "performance", "volatility", "trend", "momentum", "range", "comparison")


@dataclass
class Sample:
    id: str
    family: str
    tickers: list[str]
    as_of: str | None  # ISO date of the facts; None for undated external samples
    messages: list[dict[str, str]]
    expected: dict[str, float] = field(default_factory=dict)  # numbers an answer must state
    labels: dict[str, str] = field(default_factory=dict)  # labels an answer must state
    origin: str = "finpipe"  # "finpipe", "finpipe:paraphrase" (a held-out question wording) or "external:<file>"
    #: every slot of the family's answer forms, as written (``finpipe.instructions.families``): what strict
    #: scoring and answer verification compare with; empty for external samples
    facts: dict[str, str] = field(default_factory=dict)

    @property
    def grounded(self) -> bool:
        return self.family in GROUNDED_FAMILIES

    def text_of(self, role: str) -> str:
        return "\n".join(m.get("content", "") for m in self.messages if m.get("role") == role)

    def to_json(self) -> str:
        # sorted keys and no platform-dependent formatting: the same samples give the same bytes
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_dict(data: dict) -> "Sample":
        return Sample(
            id=data["id"], family=data["family"], tickers=list(data.get("tickers") or []), as_of=data.get("as_of"),
            messages=list(data["messages"]), expected=dict(data.get("expected") or {}),
            labels=dict(data.get("labels") or {}), origin=data.get("origin", "finpipe"),
            facts=dict(data.get("facts") or {}),
        )


def sample_id(family: str, tickers: Iterable[str], as_of: str | None, messages: list[dict[str, str]]) -> str:
    payload = json.dumps([family, list(tickers), as_of, messages], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def write_jsonl(samples: Iterable[Sample], path: Path) -> int:
    """Write atomically (temp file + rename): a crash never leaves a half-written dataset; identical content
    leaves the existing file untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
            for s in samples:
                out.write(s.to_json() + "\n")
                n += 1
        if path.exists() and _same_bytes(Path(tmp), path):
            Path(tmp).unlink()  # unchanged: the file (and its modification time) stays as it was
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def read_jsonl(path: Path) -> list[Sample]:
    with open(path, encoding="utf-8") as f:
        return [Sample.from_dict(json.loads(line)) for line in f if line.strip()]
