"""Merge external instruction data (e.g. a finance-alpaca export) from a local JSON, JSONL or CSV file.

Accepted records:
- Alpaca style: ``instruction``, ``response`` (or ``output``), optional ``input`` (appended to the
  instruction). Becomes a system/user/assistant chat in family ``external``.
- finpipe's own chat format: ``messages`` (+ optional ``family``, ``tickers``, ``as_of``, ``expected``,
  ``labels``). A record with a grounded family is fact-checked like finpipe's own samples.

Every record passes through the same quality gates as generated samples. A malformed file or record
raises ``ExternalDataError`` naming the file and record number; nothing is merged silently half-way.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from finpipe.instructions.samples import SYSTEM_PROMPT, Sample, sample_id


class ExternalDataError(ValueError):
    pass


def _records(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            out = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            out.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise ExternalDataError(f"{path.name}: line {n} is not valid JSON: {exc.msg}") from None
            return out
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise ExternalDataError(f"{path.name}: expected a JSON array of records, got {type(data).__name__}")
            return data
        if suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                header = reader.fieldnames or []
                if "instruction" not in header or not {"response", "output"} & set(header):
                    raise ExternalDataError(f"{path.name}: the CSV header needs an 'instruction' and a 'response' "
                                            f"(or 'output') column; it has {sorted(header)}")
                out = []
                for record in reader:
                    if None in record:  # more fields than the header: an unquoted comma would cut the text short
                        raise ExternalDataError(
                            f"{path.name}: line {reader.line_num} has {len(header) + len(record[None])} fields, "
                            f"the header {len(header)} (quote fields that contain commas)")
                    out.append(record)
                return out
    except json.JSONDecodeError as exc:
        raise ExternalDataError(f"{path.name}: not valid JSON: {exc.msg} (line {exc.lineno})") from None
    except UnicodeDecodeError as exc:
        raise ExternalDataError(f"{path.name}: not UTF-8 text ({exc.reason})") from None
    raise ExternalDataError(f"{path.name}: unsupported file type {suffix!r}; use .json, .jsonl or .csv")


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    return value.strip() if isinstance(value, str) else ""


def load_external(path: Path | str, system_prompt: str = SYSTEM_PROMPT) -> list[Sample]:
    path = Path(path)
    if not path.exists():
        raise ExternalDataError(f"external instruction file not found: {path}")
    samples = []
    origin = f"external:{path.name}"
    for n, record in enumerate(_records(path), 1):
        if not isinstance(record, dict):
            raise ExternalDataError(f"{path.name}: record {n} is not an object")
        if "messages" in record:
            messages = record["messages"]
            if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            ):
                raise ExternalDataError(f"{path.name}: record {n}: 'messages' must be a list of {{role, content}} strings")
            family = str(record.get("family") or "external")
            tickers = list(record.get("tickers") or [])
            as_of = record.get("as_of")
            samples.append(Sample(
                id=sample_id(family, tickers, as_of, messages), family=family, tickers=tickers, as_of=as_of,
                messages=messages, expected=dict(record.get("expected") or {}), labels=dict(record.get("labels") or {}),
                origin=origin,
            ))
            continue
        instruction = _text(record, "instruction")
        response = _text(record, "response") or _text(record, "output")
        if not instruction or not response:
            raise ExternalDataError(
                f"{path.name}: record {n} needs non-empty 'instruction' and 'response' (or 'output'), "
                f"or a 'messages' list; has keys {sorted(record)}"
            )
        extra = _text(record, "input")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": user},
                    {"role": "assistant", "content": response}]
        samples.append(Sample(id=sample_id("external", [], None, messages), family="external", tickers=[],
                              as_of=None, messages=messages, origin=origin))
    return samples
