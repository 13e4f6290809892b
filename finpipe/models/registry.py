"""Where models live in the lake, and small JSON pointers that name the current ones.

Pointers are replaced atomically (write temp + rename), so a reader sees the old or the new, never half.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


class PointerError(ValueError):
    """A pointer file that is not what finpipe wrote (empty, not JSON, a field missing)."""


def _relative(value, folder: Path):
    """``path`` fields inside the lake become relative to the pointer's folder: a moved or copied lake keeps
    working and never reaches into the original."""
    if isinstance(value, dict):
        return {k: (_to_relative(v, folder) if k == "path" else _relative(v, folder)) for k, v in value.items()}
    return value


def _to_relative(path, folder: Path):
    if not isinstance(path, str) or not Path(path).is_absolute():
        return path
    lake = folder.resolve().parents[1] if len(folder.resolve().parents) > 1 else folder.resolve()
    target = Path(path).resolve()
    if target != lake and lake not in target.parents:
        return path  # outside the lake (a local model folder): kept as given
    return os.path.relpath(target, folder.resolve())


def _absolute(value, folder: Path):
    if isinstance(value, dict):
        return {k: (str((folder / v).resolve()) if k == "path" and isinstance(v, str) and not Path(v).is_absolute()
                    else _absolute(v, folder)) for k, v in value.items()}
    return value


def write_pointer(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(_relative(payload, path.parent), f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_pointer(path: Path, required: tuple[str, ...] = ("path",)) -> dict:
    """The pointer's payload with its paths absolute again (resolved from the pointer's own folder).

    Anything else is a ``PointerError`` naming the file, never a KeyError or TypeError further on: a payload that is
    not an object, a missing field, a field of the wrong type, or a relative path that leads out of the lake (a
    pointer only ever names folders inside it relatively; ``../../etc`` is not one finpipe wrote)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: materialize the asset that writes it first")
    try:
        payload = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise PointerError(f"{path} is not a finpipe pointer (not valid JSON: {exc}); rerun `finpipe run` to "
                           "rewrite it, or restore it from a lake snapshot") from None
    missing = [k for k in required if not isinstance(payload, dict) or k not in payload]
    problem = (f"missing {', '.join(missing)}" if missing
               else _shape_problem(payload, path.parent, _lake_of(path.parent)))
    if problem:
        raise PointerError(f"{path} is not a finpipe pointer ({problem}); rerun `finpipe run` to rewrite it, or "
                           "restore it from a lake snapshot")
    return _absolute(payload, path.parent)


#: pointer fields that, where present, must be strings; ``base`` must be a nested pointer ({name, path})
_TEXT_FIELDS = ("path", "run_id", "name", "fingerprint")


def _lake_of(folder: Path) -> Path:
    """The lake a pointer's folder belongs to (pointers live in <lake>/models/<kind>/), as ``_to_relative`` sees it."""
    folder = folder.resolve()
    return folder.parents[1] if len(folder.parents) > 1 else folder


def _shape_problem(payload: dict, folder: Path, lake: Path) -> str | None:
    for key in _TEXT_FIELDS:
        if key in payload and not isinstance(payload[key], str):
            return f"{key} must be a string, got {type(payload[key]).__name__}"
    if "base" in payload:
        if not isinstance(payload["base"], dict) or not {"name", "path"} <= set(payload["base"]):
            return "base must be an object with name and path"
        if problem := _shape_problem(payload["base"], folder, lake):
            return f"base: {problem}"
    path = payload.get("path")
    if isinstance(path, str) and not Path(path).is_absolute():
        target = (folder / path).resolve()
        if target != lake and lake not in target.parents:
            return f"path {path!r} leads out of the lake {lake}"
    return None


#: what an adapter pointer (champion.json, latest.json) and the base pointer (base/current.json) must hold
ADAPTER_POINTER_FIELDS = ("run_id", "path", "base")
BASE_POINTER_FIELDS = ("name", "path")


def models_dir(lake_dir: Path) -> Path:
    return lake_dir / "models"


def base_pointer(lake_dir: Path) -> Path:
    return models_dir(lake_dir) / "base" / "current.json"


def adapters_dir(lake_dir: Path) -> Path:
    return models_dir(lake_dir) / "adapters"


def latest_adapter_pointer(lake_dir: Path) -> Path:
    return adapters_dir(lake_dir) / "latest.json"


def champion_pointer(lake_dir: Path) -> Path:
    """The promoted adapter: written only by promotion, only when a challenger wins."""
    return adapters_dir(lake_dir) / "champion.json"


def resolve_adapter(lake_dir: Path, which: str) -> dict | None:
    """``champion`` | ``latest`` | ``none`` | a folder -> the pointer payload ({run_id, path, base}) or None."""
    if which == "none":
        return None
    if which in ("champion", "latest"):
        pointer = champion_pointer(lake_dir) if which == "champion" else latest_adapter_pointer(lake_dir)
        if not pointer.exists():
            raise FileNotFoundError(
                f"no {which} adapter yet ({pointer} is missing): run `finpipe run` first"
                + (" (a run promotes its adapter when it beats the base model and the previous champion)"
                   if which == "champion" else "")
            )
        return read_pointer(pointer, required=ADAPTER_POINTER_FIELDS)
    folder = Path(which).expanduser().resolve()
    if not (folder / "adapter_config.json").exists():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
    return {"run_id": folder.name, "path": str(folder),
            "base": read_pointer(base_pointer(lake_dir), required=BASE_POINTER_FIELDS)}


def warm_start(lake_dir: Path, base: dict, log=print) -> tuple[str | None, int]:
    """(adapter folder to continue from, the tokens it was trained on) for a nightly warm start: the champion when
    it was trained on the same base, else (None, 0) — a fresh adapter."""
    pointer = champion_pointer(lake_dir)
    champion = read_pointer(pointer, required=ADAPTER_POINTER_FIELDS) if pointer.exists() else None
    if champion is None:
        log("warm start: no champion yet, training a fresh adapter")
        return None, 0
    if champion["base"]["path"] != base["path"]:
        log(f"warm start: the champion {champion['run_id']} was trained on {champion['base']['name']}, "
            f"not {base['name']}: training a fresh adapter")
        return None, 0
    try:
        report = json.loads((Path(champion["path"]) / "training_report.json").read_text())
        tokens = int(report.get("cumulative_train_tokens") or report.get("train_tokens") or 0)
    except (OSError, ValueError):
        tokens = 0
    return champion["path"], tokens


# --------------------------------------------------------------------------- the run registry (in the lake)

RUNS_SQL = """
CREATE TABLE IF NOT EXISTS model_runs (
    run_id          VARCHAR PRIMARY KEY,
    created_at      TIMESTAMP NOT NULL,
    base_model      VARCHAR NOT NULL,
    quantization    VARCHAR NOT NULL,
    train_first     DATE,
    train_last      DATE,
    val_cutoff      DATE,
    config_hash     VARCHAR NOT NULL,
    adapter_path    VARCHAR NOT NULL,
    golden_hash     VARCHAR,
    val_loss        DOUBLE,
    base_val_loss   DOUBLE,
    golden_loss     DOUBLE,
    golden_number_correctness DOUBLE,
    golden_label_correctness  DOUBLE,
    golden_exact_match        DOUBLE,
    golden_quality            DOUBLE,
    forgetting_probe          DOUBLE,
    train_tokens              BIGINT,
    train_processes           INTEGER,
    metrics_json    VARCHAR,
    status          VARCHAR NOT NULL,   -- evaluated | champion | rejected | retired
    decided_at      TIMESTAMP,
    reason          VARCHAR
)
"""
RUN_STATUSES = ("evaluated", "champion", "rejected", "retired")
#: columns added since the table was first shipped: a lake written by an older finpipe gains them on first use
ADDED_COLUMNS = {"golden_number_correctness": "DOUBLE", "golden_label_correctness": "DOUBLE",
                 "golden_exact_match": "DOUBLE", "golden_quality": "DOUBLE", "forgetting_probe": "DOUBLE",
                 "train_tokens": "BIGINT", "train_processes": "INTEGER",
                 "mlflow_run_id": "VARCHAR",  # the adapter's MLflow run, when tracking was on (finpipe.tracking)
                 # what started the run (its finpipe/trigger tag: nightly, drift; manual without one) and, for a
                 # drift-triggered run, the sensor's reason (finpipe.statistics.drift)
                 "run_trigger": "VARCHAR", "trigger_reason": "VARCHAR",
                 # what `finpipe reproduce` rebuilds the run's inputs from (finpipe.reproduce.recorded_inputs)
                 "train_sha256": "VARCHAR", "val_sha256": "VARCHAR", "prices_through": "DATE",
                 "dataset_spec_json": "VARCHAR", "split_spec_json": "VARCHAR", "adapter_spec_json": "VARCHAR",
                 "base_model_sha256": "VARCHAR", "code_version": "VARCHAR"}


class RunRegistry:
    """``model_runs`` in the lake: one row per evaluated adapter, its data window, config hash, metrics,
    path and promotion status. The champion pointer file mirrors the row whose status is ``champion``."""

    def __init__(self, lake) -> None:  # a finpipe.market.lake.PriceLake
        self.lake = lake

    @contextmanager
    def _connect(self):
        """A write connection on the lake with the table in place (created on first use)."""
        with self.lake.connect() as con:
            con.execute(RUNS_SQL)
            for column, kind in ADDED_COLUMNS.items():
                con.execute(f"ALTER TABLE model_runs ADD COLUMN IF NOT EXISTS {column} {kind}")
            yield con

    def record(self, row: dict) -> None:
        """Insert or replace one run (re-evaluating a run replaces its row)."""
        row = dict(row)
        if row.get("status", "evaluated") not in RUN_STATUSES:
            raise ValueError(f"status must be one of {RUN_STATUSES}, got {row['status']!r}")
        row.setdefault("status", "evaluated")
        if isinstance(row.get("metrics_json"), dict):
            row["metrics_json"] = json.dumps(row["metrics_json"], sort_keys=True)
        with self._connect() as con:
            columns = [c[0] for c in con.execute("DESCRIBE model_runs").fetchall()]
            unknown = set(row) - set(columns)
            if unknown:
                raise ValueError(f"unknown model_runs columns: {sorted(unknown)}")
            names = [c for c in columns if c in row]
            con.execute(f"INSERT OR REPLACE INTO model_runs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                        [row[c] for c in names])

    def get(self, run_id: str) -> dict | None:
        frame = self.runs(where="run_id = ?", params=[run_id])
        return frame.row(0, named=True) if frame.height else None

    def runs(self, where: str = "1=1", params: list | None = None):
        """All runs, newest first, as a Polars frame (empty with the right columns before the first run)."""
        with self._connect() as con:
            return con.sql(f"SELECT * FROM model_runs WHERE {where} ORDER BY created_at DESC, run_id DESC",
                           params=params or []).pl()

    def promote(self, run_id: str, pointer: Path, payload: dict, reason: str) -> None:
        """Make ``run_id`` the champion: the table (previous champion -> retired) in one transaction, then the
        pointer file in one rename. A crash between the two leaves the old pointer, which promotion repairs
        on its next run (the table is the record; the pointer follows it)."""
        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        from finpipe.market.lake import transaction

        with self._connect() as con, transaction(con):
            con.execute("UPDATE model_runs SET status = 'retired' WHERE status = 'champion' AND run_id <> ?", [run_id])
            con.execute("UPDATE model_runs SET status = 'champion', decided_at = ?, reason = ? WHERE run_id = ?",
                        [now, reason, run_id])
        write_pointer(pointer, payload)

    def reject(self, run_id: str, reason: str) -> None:
        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        with self._connect() as con:
            con.execute("UPDATE model_runs SET status = 'rejected', decided_at = ?, reason = ? WHERE run_id = ?",
                        [now, reason, run_id])
