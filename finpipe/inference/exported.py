"""Where the lake remembers its GGUF exports, so that ``finpipe serve`` can run the champion's with llama.cpp.

``finpipe export --gguf DIR`` writes its files anywhere the user chooses; the lake only knows about them through a
small pointer per run, ``<lake>/models/exports/<run id>.json`` (written atomically): the run id, the file a server
runs (q8_0 where the export wrote one, as the Modelfile does), its type and its SHA-256. A server checks the hash
before loading the file: a file replaced or damaged since the export is refused, never served as the champion.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

#: the file a server runs, by preference (the Modelfile ships q8_0 too)
SERVED_OUTTYPES = ("q8_0", "bf16", "f16", "f32")
EXPORT_POINTER_FIELDS = ("run_id", "path", "outtype", "sha256")


@dataclass(frozen=True)
class GgufRecord:
    run_id: str
    path: Path  # the GGUF file
    outtype: str
    sha256: str | None  # None: a file given by hand (--gguf) that no export recorded

    def line(self) -> str:
        return f"{self.outtype} GGUF {self.path}"


def exports_dir(lake_dir: Path) -> Path:
    from finpipe.models import registry

    return registry.models_dir(lake_dir) / "exports"


def export_pointer(lake_dir: Path, run_id: str) -> Path:
    return exports_dir(lake_dir) / f"{run_id}.json"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_export(lake_dir: Path, run_id: str, files: list) -> GgufRecord | None:
    """Record the export of ``run_id`` (``files``: its ``GgufFile``s, at their final paths) in the lake; None when it
    wrote no type a server runs."""
    from finpipe.models import registry

    served = next((f for t in SERVED_OUTTYPES for f in files if f.outtype == t), None)
    if served is None:
        return None
    path = Path(served.path).resolve()
    record = GgufRecord(run_id, path, served.outtype, sha256_of(path))
    registry.write_pointer(export_pointer(lake_dir, run_id), {
        "run_id": run_id, "path": str(path), "outtype": record.outtype, "sha256": record.sha256,
        "size_bytes": path.stat().st_size, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return record


def recorded_export(lake_dir: Path, run_id: str) -> GgufRecord | None:
    """The recorded export of ``run_id``; None when there is none. A broken record or a file that is gone is a
    ``ValueError`` / ``FileNotFoundError`` naming what to do."""
    from finpipe.models import registry

    pointer = export_pointer(lake_dir, run_id)
    if not pointer.exists():
        return None
    payload = registry.read_pointer(pointer, required=EXPORT_POINTER_FIELDS)
    if payload["run_id"] != run_id:
        raise ValueError(f"{pointer} records run {payload['run_id']}, not {run_id}: run `finpipe export --gguf DIR` "
                         "again")
    path = Path(payload["path"])
    if not path.is_file():
        raise FileNotFoundError(f"the GGUF export of {run_id} recorded at {path} is gone: run `finpipe export --gguf "
                                "DIR` again")
    return GgufRecord(run_id, path, payload["outtype"], payload["sha256"])


def given_gguf(path: Path, lake_dir: Path, run_id: str) -> GgufRecord:
    """A GGUF file named by hand (``serve --gguf PATH``) as the champion's: it must be a file, and when its folder's
    export manifest names a run, that run must be the champion (another run's weights are never served under the
    champion's name). Its hash is checked when the lake recorded this very file."""
    from finpipe.inference.export import EXPORT_MANIFEST

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"--gguf {path}: no such file")
    manifest = path.parent / EXPORT_MANIFEST
    exported = None
    if manifest.exists():
        try:
            exported = json.loads(manifest.read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            exported = None
    if exported and exported != run_id:
        raise ValueError(f"--gguf {path} is an export of run {exported}, but the champion is {run_id}: export the "
                         "champion (`finpipe export --gguf DIR`) or serve that file elsewhere")
    try:
        recorded = recorded_export(lake_dir, run_id)
    except (ValueError, FileNotFoundError):
        recorded = None
    if recorded is not None and recorded.path == path:
        return recorded
    outtype = next((t for t in SERVED_OUTTYPES if path.name.endswith(f".{t}.gguf")), "gguf")
    return GgufRecord(run_id, path, outtype, None)


def check_hash(record: GgufRecord) -> None:
    """Raise ``ValueError`` when the file no longer is the one the export recorded."""
    if record.sha256 is None:
        return
    found = sha256_of(record.path)
    if found != record.sha256:
        raise ValueError(f"{record.path} does not match the SHA-256 its export recorded ({found[:12]}... instead of "
                         f"{record.sha256[:12]}...): it changed since; run `finpipe export --gguf DIR --force` again")
