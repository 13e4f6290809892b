"""Where models live in the lake, and small JSON pointers that name the current ones.

Pointers are replaced atomically (write temp + rename), so a reader sees the old or the new, never half.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_pointer(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_pointer(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: materialize the asset that writes it first")
    return json.loads(path.read_text())


def models_dir(lake_dir: Path) -> Path:
    return lake_dir / "models"


def base_pointer(lake_dir: Path) -> Path:
    return models_dir(lake_dir) / "base" / "current.json"


def adapters_dir(lake_dir: Path) -> Path:
    return models_dir(lake_dir) / "adapters"


def latest_adapter_pointer(lake_dir: Path) -> Path:
    return adapters_dir(lake_dir) / "latest.json"
