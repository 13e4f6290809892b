"""Fault injection: finpipe loses nothing when a process is killed, the lake is locked, the network fails or an
input is malformed.

Real processes and real files. A child process is SIGKILLed at a deterministic point: it signals readiness through
a file from inside the window under test (a transaction that is open, a checkpoint half-written, an adapter not yet
renamed into place) and then waits to be killed; the stall is faked inside the child, the kill is the fault.
Only the network is faked (at the ``yfinance.download`` boundary, as in test_yahoo_source.py).
Every child runs under a timeout, so nothing can hang CI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import duckdb
import pydantic
import pytest

from finpipe.market.ingest import IngestRequest, ingest
from finpipe.market.lake import LakeLockedError, PriceLake
from finpipe.market.sources import ReplaySource, SimulatedSource
from finpipe.market.universes import US_CORE
from finpipe.paths import LAKE_DB_NAME, REPO_ROOT
from finpipe_tests.helpers import d

CHILD_START_S = 180  # generous: a child imports torch/transformers or polars/duckdb on a loaded 2-core machine


# -------------------------------------------------------------------------------------------------- child processes


@pytest.fixture
def children():
    """Every child process a test starts; any still running at teardown is killed (by its own pid)."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if proc.stdin:
            proc.stdin.close()


def spawn(children: list, code: str, *args, log: Path, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO_ROOT, stdin=stdin,
                                stdout=out, stderr=subprocess.STDOUT,
                                env=os.environ | {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    children.append(proc)
    return proc


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = CHILD_START_S) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the child exited with {proc.returncode} before writing {path.name}:\n{tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"the child wrote no {path.name} within {timeout:.0f} s:\n{tail(log)}")
        time.sleep(0.05)


def sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def finish(proc: subprocess.Popen, log: Path, timeout: float = CHILD_START_S) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        pytest.fail(f"the child did not finish within {timeout:.0f} s:\n{tail(log)}")
    assert proc.returncode == 0, tail(log)
    return log.read_text(errors="replace")


# ----------------------------------------------------------------------------------------------- SIGKILL mid-ingest

#: 24 simulated tickers x 25 years of NYSE sessions: ~151k rows, more than a DuckDB row group (122,880 rows), so the
#: uncommitted batch goes through DuckDB's optimistic writes into the file before COMMIT.
SIM_TICKERS = [f"SIM{i:02d}" for i in range(24)]
SIM_UNIVERSE = US_CORE.restricted_to(SIM_TICKERS)
BIG_RANGE = ("2000-01-03", "2024-12-31")
SMALL_RANGE = ("2024-01-02", "2024-03-28")  # inside the big range: the rerun replaces these rows

INGEST_CHILD = r"""
import datetime as dt, sys, time
from pathlib import Path
from finpipe.market.ingest import IngestRequest, ingest
from finpipe.market.lake import PriceLake
from finpipe.market.sources import SimulatedSource
from finpipe.market.universes import US_CORE

lake_path, ready, first, last, *tickers = sys.argv[1:]
universe = US_CORE.restricted_to(tickers)
batch = ingest(SimulatedSource(calendar="XNYS", seed=7),
               IngestRequest(universe, dt.date.fromisoformat(first), dt.date.fromisoformat(last)))
if ready != "-":
    # the last step inside write_batch's transaction: BEGIN, refusals, upsert, rejects and log are done; COMMIT is next
    register = PriceLake._register_instruments
    def stall(con, universe, batch):
        register(con, universe, batch)
        Path(ready).write_text(str(batch.clean.height))
        time.sleep(600)
    PriceLake._register_instruments = staticmethod(stall)
summary = PriceLake(lake_path).write_batch(batch, run_id="big-batch")
print("written", summary.inserted, summary.replaced, flush=True)
"""

VALUE_COLUMNS = "ticker, date, open, high, low, close, adj_close, volume, source, simulated"


def lake_state(db: Path) -> dict:
    """Everything a batch writes, in a comparable form (ingested_at / logged_at are wall-clock, left out)."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        q = lambda sql: con.execute(sql).fetchall()  # noqa: E731
        return {
            "prices": q(f"SELECT {VALUE_COLUMNS} FROM prices ORDER BY ticker, date"),
            "ingest_log": q("SELECT run_id, ticker, status, rows_written FROM ingest_log ORDER BY run_id, ticker"),
            "instruments": q("SELECT * FROM instruments ORDER BY ticker"),
            "price_rejects": q("SELECT reject_id FROM price_rejects ORDER BY 1"),
            "duplicate_keys": q("SELECT count(*) - count(DISTINCT (ticker, date)) FROM prices")[0][0],
        }
    finally:
        con.close()


def simulated_batch(first: str, last: str):
    return ingest(SimulatedSource(calendar="XNYS", seed=7), IngestRequest(SIM_UNIVERSE, d(first), d(last)))


def test_sigkill_inside_the_ingest_transaction_leaves_the_lake_as_it_was_and_the_rerun_completes_it(
        isolated_lake, tmp_path, children):
    db = isolated_lake / LAKE_DB_NAME
    small = simulated_batch(*SMALL_RANGE)
    PriceLake(db).write_batch(small, run_id="small-batch")
    before = lake_state(db)
    assert len(before["prices"]) == small.clean.height == 24 * 61  # NYSE sessions 2024-01-02..03-28
    assert len(before["ingest_log"]) == 24 and len(before["instruments"]) == 24
    size_before = db.stat().st_size

    ready, log = tmp_path / "ingest.ready", tmp_path / "ingest-killed.log"
    child = spawn(children, INGEST_CHILD, db, ready, *BIG_RANGE, *SIM_TICKERS, log=log)
    wait_for(ready, child, log)
    big_rows = int(ready.read_text())
    assert big_rows == 24 * 6289  # NYSE sessions 2000-01-03..2024-12-31
    assert db.stat().st_size > size_before  # the uncommitted row groups are already in the file
    # the open transaction holds the file: another process cannot read a half-written batch, it waits and fails
    with pytest.raises(LakeLockedError, match=f"PID {child.pid}"):
        PriceLake(db, lock_timeout_s=0.5).prices()
    sigkill(child)
    assert "written" not in tail(log)

    assert lake_state(db) == before  # not one row of the ~151k-row batch, no log line, no instrument

    rerun_log = tmp_path / "ingest-rerun.log"
    rerun = spawn(children, INGEST_CHILD, db, "-", *BIG_RANGE, *SIM_TICKERS, log=rerun_log)
    assert f"written {big_rows - len(before['prices'])} {len(before['prices'])}" in finish(rerun, rerun_log)

    clean_db = tmp_path / "clean" / LAKE_DB_NAME  # the same batch into a lake that never saw a crash
    PriceLake(clean_db).write_batch(simulated_batch(*BIG_RANGE), run_id="big-batch")
    after, clean = lake_state(db), lake_state(clean_db)
    assert len(after["prices"]) == big_rows and after["duplicate_keys"] == 0
    assert after["prices"] == clean["prices"]
    assert after["instruments"] == clean["instruments"]
    # the log has the first batch and the rerun; the killed attempt left no trace
    assert [row[:2] for row in after["ingest_log"]] == (
        [("big-batch", t) for t in SIM_TICKERS] + [("small-batch", t) for t in SIM_TICKERS])


# ------------------------------------------------------------------------------- the lake locked by another process

LOCK_HOLDER = r"""
import sys, time, duckdb
from pathlib import Path
con = duckdb.connect(sys.argv[1])  # a read-write connection: DuckDB's exclusive file lock
con.execute("BEGIN TRANSACTION")
con.execute("SELECT count(*) FROM prices").fetchall()
Path(sys.argv[2]).write_text("held")
hold = float(sys.argv[3])
sys.stdin.read() if hold < 0 else time.sleep(hold)  # hold < 0: until the test closes our stdin
con.close()
"""


def replay_lake(db: Path) -> int:
    batch = ingest(ReplaySource(), IngestRequest(US_CORE, d("2013-02-25"), d("2013-03-01")))
    PriceLake(db).write_batch(batch, run_id="replay")
    return batch.clean.height


def hold_lock(children, db: Path, tmp_path: Path, hold_s: float) -> subprocess.Popen:
    ready, log = tmp_path / "lock.ready", tmp_path / "lock-holder.log"
    holder = spawn(children, LOCK_HOLDER, db, ready, hold_s, log=log, stdin=subprocess.PIPE)
    wait_for(ready, holder, log)
    return holder


def release(holder: subprocess.Popen) -> None:
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0


def test_a_lake_held_by_another_process_fails_within_the_timeout_naming_the_holder_then_works_once_released(
        isolated_lake, tmp_path, children):
    db = isolated_lake / LAKE_DB_NAME
    rows = replay_lake(db)
    assert rows == 20
    batch = ingest(ReplaySource(), IngestRequest(US_CORE, d("2013-02-25"), d("2013-03-01")))
    lake = PriceLake(db, lock_timeout_s=1)
    holder = hold_lock(children, db, tmp_path, hold_s=-1)
    for attempt in (lake.prices, lambda: lake.write_batch(batch, run_id="blocked")):  # a reader and a writer
        started = time.monotonic()
        with pytest.raises(LakeLockedError) as failure:
            attempt()
        elapsed = time.monotonic() - started
        assert 1.0 <= elapsed < 5.0, elapsed
        message = str(failure.value)
        assert message.startswith(f"lake {db} is locked by another process (waited 1s): ")
        assert "Conflicting lock is held" in message and f"(PID {holder.pid})" in message
    release(holder)

    assert lake.prices().height == rows
    summary = lake.write_batch(batch, run_id="after-release")
    assert (summary.inserted, summary.replaced) == (0, rows)
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM ingest_log WHERE run_id = 'blocked'").fetchall() == [(0,)]
    con.close()


def test_a_lock_released_while_waiting_lets_the_waiting_call_through(isolated_lake, tmp_path, children):
    db = isolated_lake / LAKE_DB_NAME
    rows = replay_lake(db)
    holder = hold_lock(children, db, tmp_path, hold_s=1.5)
    started = time.monotonic()
    assert PriceLake(db, lock_timeout_s=20).prices().height == rows  # retried with backoff until the lock went
    elapsed = time.monotonic() - started
    assert 0.5 < elapsed < 10, elapsed
    assert holder.wait(timeout=30) == 0


def test_cli_sql_and_runs_on_a_locked_lake_exit_3_with_one_line(isolated_lake, tmp_path, children, capsys,
                                                                 monkeypatch):
    from finpipe import cli
    from finpipe.market import lake as lake_module

    db = isolated_lake / LAKE_DB_NAME
    rows = replay_lake(db)

    class OneSecondLock(PriceLake):  # the commands use the 30 s default; a second keeps the test short
        def __init__(self, path, lock_timeout_s: float = 1.0) -> None:
            super().__init__(path, lock_timeout_s)

    monkeypatch.setattr(lake_module, "PriceLake", OneSecondLock)
    holder = hold_lock(children, db, tmp_path, hold_s=-1)
    for argv in (["sql", "SELECT count(*) AS n FROM prices", "--lock-timeout", "1"], ["runs"]):
        started = time.monotonic()
        code = cli.main(argv)
        elapsed = time.monotonic() - started
        out, err = capsys.readouterr()
        assert code == 3, (argv, out, err)
        assert out == "" and len(err.splitlines()) == 1, err
        assert err.startswith(f"error: lake {db} is locked by another process (waited 1s): ")
        assert f"(PID {holder.pid})" in err
        assert elapsed < 5, elapsed
    release(holder)

    assert cli.main(["sql", "SELECT count(*) AS n FROM prices"]) == 0
    assert f"│ {rows}" in capsys.readouterr().out
    assert cli.main(["runs"]) == 0
    assert capsys.readouterr().out.startswith("no runs yet")


def test_lake_check_and_restore_on_a_locked_lake_exit_3_naming_the_holder_and_change_nothing(
        isolated_lake, tmp_path, children, capsys):
    """A lake another process holds is not damaged: `lake check` once called it DAMAGED (exit 4) and advised a
    restore, and `lake restore` replaced it under the holder, whose later commits went into the file put aside."""
    from finpipe import cli

    db = isolated_lake / LAKE_DB_NAME
    replay_lake(db)
    assert cli.main(["lake", "snapshot"]) == 0
    capsys.readouterr()
    before = db.read_bytes()
    holder = hold_lock(children, db, tmp_path, hold_s=-1)
    for action in ("check", "restore"):
        code = cli.main(["lake", action])
        out, err = capsys.readouterr()
        assert code == cli.EXIT_LAKE_LOCKED, (action, out, err)
        assert out == "" and len(err.splitlines()) == 1, err
        assert f"is held by another process (pid {holder.pid})" in err and "DAMAGED" not in err
        assert "lake restore" not in err  # no advice to restore a lake that is merely busy
    assert not list(isolated_lake.glob(f"{LAKE_DB_NAME}.*-*"))  # nothing put aside
    release(holder)
    assert db.read_bytes() == before
    assert cli.main(["lake", "check"]) == 0 and "ok (" in capsys.readouterr().out


RESTORE_WAITER = r"""
import sys
from pathlib import Path
import polars as pl
from finpipe.market.lake import PriceLake

db, ready = sys.argv[1:]
Path(ready).write_text("connecting")
PriceLake(db, lock_timeout_s=120).replace_table("written_during_restore", pl.DataFrame({"n": [1]}))
print("written", flush=True)
"""


def test_a_writer_that_arrives_during_a_restore_waits_and_writes_into_the_restored_lake(
        isolated_lake, tmp_path, children):
    """``restore`` holds the lake's lock from its check to the swap: a process that wants to write meanwhile waits
    for the lock and then writes into the restored lake, never into the file put aside."""
    from finpipe.market import snapshots

    db = isolated_lake / LAKE_DB_NAME
    rows = replay_lake(db)
    snapshots.snapshot(db)
    db.write_bytes(b"this is not a duckdb file" * 100)  # damaged
    ready, log = tmp_path / "waiter.ready", tmp_path / "waiter.log"
    put_aside = snapshots._put_aside

    def while_holding_the_lock(*args):
        waiter = spawn(children, RESTORE_WAITER, db, ready, log=log)
        wait_for(ready, waiter, log)
        time.sleep(3)  # the waiter is in its lock wait now (or still importing): either way it has not written
        assert waiter.poll() is None, tail(log)
        return put_aside(*args)

    snapshots._put_aside = while_holding_the_lock
    try:
        done = snapshots.restore(db, log=lambda line: None)
    finally:
        snapshots._put_aside = put_aside
    assert done.damaged and done.aside.name.startswith(f"{LAKE_DB_NAME}.damaged-")
    [waiter] = children
    assert "written" in finish(waiter, log)
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM written_during_restore").fetchall() == [(1,)]
    assert con.execute("SELECT count(*) FROM prices").fetchall() == [(rows,)]
    con.close()
    assert done.aside.read_bytes() == b"this is not a duckdb file" * 100  # the damaged file, as it was


# ---------------------------------------------------------------------------------------- network faults end to end


def step_failure(result) -> str:
    """The failed step's error message and the messages of its causes, outermost first."""
    error = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").event_specific_data.error
    messages = []
    while error is not None:
        messages.append(error.message)
        error = error.cause
    return "\n".join(messages)


class DeadNetwork:
    """``yfinance.download`` on a broken network: every call raises, or never answers until released."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.calls = 0
        self.released = threading.Event()

    def __call__(self, tickers, **kwargs):
        self.calls += 1
        if self.mode == "silent":
            self.released.wait(60)  # a socket that swallows packets; the source stops waiting at its deadline
        raise TimeoutError(110, "Connection timed out")  # what a timed-out socket raises (errno ETIMEDOUT)


@pytest.mark.parametrize("mode", ["raises", "silent"])
def test_a_dead_network_fails_the_run_naming_every_ticker_and_writes_nothing(mode, lake_resources, isolated_lake,
                                                                             monkeypatch):
    import yfinance

    from finpipe_tests.helpers import FakeYahoo, query, run_yahoo

    assert run_yahoo(lake_resources, monkeypatch, FakeYahoo()).success  # a lake with yesterday's Yahoo rows
    before = query(isolated_lake, f"SELECT {VALUE_COLUMNS} FROM prices ORDER BY ticker, date")
    log_before = query(isolated_lake, "SELECT count(*) FROM ingest_log")
    assert len(before) == 10

    network = DeadNetwork(mode)
    monkeypatch.setattr(yfinance, "download", network)
    resources = lake_resources(source="yahoo", tickers=["AAPL", "MSFT", "DEAD"], yahoo_timeout_s=0.5,
                               yahoo_max_attempts=3, yahoo_backoff_s=0.01, yahoo_deadline_s=2.0,
                               retry_when_all_fail=False)
    from finpipe.definitions import in_groups
    from finpipe.defs.partitions import PARTITION_RANGE_END_TAG, PARTITION_RANGE_START_TAG

    started = time.monotonic()
    try:
        result = dg.materialize(in_groups("market_data"), resources=resources, raise_on_error=False,
                                tags={PARTITION_RANGE_START_TAG: "2013-03-04", PARTITION_RANGE_END_TAG: "2013-03-08"})
    finally:
        network.released.set()
    elapsed = time.monotonic() - started
    assert not result.success
    message = step_failure(result)
    # the window of the last partition (Friday 03-08) ends where the next one starts: Monday 03-11, exclusive
    assert "every ticker failed from source yahoo for 2013-03-04..2013-03-10: " in message
    if mode == "raises":
        assert network.calls == 3  # every attempt, then the run fails
        for ticker in ("AAPL", "MSFT", "DEAD"):
            assert f"{ticker}: TimeoutError: [Errno 110] Connection timed out (after 3 attempts)" in message
    else:
        assert network.calls == 1  # the first attempt never answered: the 2 s deadline ends the whole fetch
        for ticker in ("AAPL", "MSFT", "DEAD"):
            assert f"{ticker}: no answer within the 2s deadline (network unreachable or silent?) (attempt 1)" in message
    assert elapsed < 30, elapsed  # not 3 attempts x yfinance's 30 s defaults
    assert query(isolated_lake, f"SELECT {VALUE_COLUMNS} FROM prices ORDER BY ticker, date") == before
    assert query(isolated_lake, "SELECT count(*) FROM ingest_log") == log_before
    assert not result.get_asset_check_evaluations()  # the blocking checks never ran on a failed step


# ------------------------------------------------------------------------------------------------- malformed inputs


@pytest.mark.parametrize("name, content, message", [
    ("curated.csv", "question,answer\nWhat is beta?,Sensitivity to the market.\n",
     r"curated.csv: the CSV header needs an 'instruction' and a 'response' \(or 'output'\) column; "
     r"it has \['answer', 'question'\]"),
    ("curated.csv", "instruction,response\nDefine beta.,Sensitivity.\nWhat is a dividend?,A payment, in cash.\n",
     r"curated.csv: line 3 has 3 fields, the header 2 \(quote fields that contain commas\)"),
    ("curated.csv", "instruction,response\n,A payment, in cash.\n",
     r"curated.csv: line 2 has 3 fields, the header 2"),
    ("curated.csv", "", r"curated.csv: the CSV header needs .* it has \[\]"),
    ("curated.json", '{"instruction": "Define beta.", "response": "Sensitivity."}',
     "curated.json: expected a JSON array of records, got dict"),
    ("curated.json", '[{"instruction": "Define beta.", "response": "Sensitivity."},\n {"instruction": "x"\n',
     r"curated.json: not valid JSON: .* \(line 3\)"),
    ("curated.jsonl", '{"instruction": "Define beta.", "response": "Sensitivity."}\n["a", "list"]\n',
     "curated.jsonl: record 2 is not an object"),
    ("curated.jsonl", '{"instruction": "   ", "output": "Sensitivity."}\n',
     r"curated.jsonl: record 1 needs non-empty 'instruction' and 'response' \(or 'output'\).*"
     r"has keys \['instruction', 'output'\]"),
    ("curated.jsonl", b'{"instruction": "Define \xe9", "response": "x"}\n', r"curated.jsonl: not UTF-8 text"),
    ("curated.jsonl", None, r"external instruction file not found: .*/curated.jsonl"),
], ids=["csv-without-the-columns", "csv-unquoted-comma", "csv-unquoted-comma-no-instruction", "csv-empty",
        "json-object-not-array", "json-broken", "jsonl-record-not-an-object", "jsonl-blank-instruction",
        "jsonl-not-utf8", "missing-file"])
def test_malformed_external_instruction_files_name_the_file_and_the_problem(tmp_path, name, content, message):
    from finpipe.instructions.external import ExternalDataError, load_external

    path = tmp_path / name
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ExternalDataError, match=message):
        load_external(path)


def test_malformed_market_config_is_rejected_before_any_work():
    from finpipe.defs.resources import MarketDataResource
    from finpipe.market.sources import YahooSource

    # an unknown source, universe or replay date:
    # test_sources_and_config.py::test_unknown_universe_and_source_are_clear_errors
    for changes, message in [({"yahoo_max_attempts": 0}, "must be >= 1, got 0"),
                             ({"yahoo_timeout_s": 0}, "must be > 0, got 0"),
                             ({"yahoo_deadline_s": -5}, "must be > 0, got -5")]:
        with pytest.raises(pydantic.ValidationError, match=message):
            MarketDataResource(**changes)
    with pytest.raises(ValueError, match="max_attempts must be >= 1, got 0"):
        YahooSource(max_attempts=0)


def test_an_invalid_adapter_config_fails_the_step_before_any_work(lake_resources, isolated_lake):
    from finpipe.defs.models import qlora_adapter

    bad = {"lora_r": 0, "learning_rate": 0.0}
    result = dg.materialize([qlora_adapter], resources=lake_resources(), raise_on_error=False,
                            run_config={"ops": {"qlora_adapter": {"config": bad}}})
    assert not result.success
    message = step_failure(result)
    assert "ValueError: invalid training config: lora_r must be > 0, got 0; learning_rate must be > 0, got 0.0" \
        in message
    assert not (isolated_lake / "models").exists()  # refused before reading the base or creating a job folder


def test_float_settings_must_be_finite():
    """NaN passes every range check (``nan <= 0`` is false) and inf any lower bound: a NaN learning rate or an
    infinite budget used to start training. Each spec refuses them, and so does every spec's run-config class."""
    from finpipe.defs.evaluation import EvaluationConfig
    from finpipe.defs.models import AdapterTrainingConfig
    from finpipe.models.scratch import ScratchGPTSpec
    from finpipe.studies.compression import CompressionSpec
    from finpipe.studies.peft_study import PeftStudySpec
    from finpipe.training.spec import AdapterSpec

    nan, inf = float("nan"), float("inf")
    for make, message in [(lambda: AdapterSpec(learning_rate=nan), "learning_rate must be a finite number, got nan"),
                          (lambda: AdapterSpec(max_minutes=inf), "max_minutes must be a finite number, got inf"),
                          (lambda: AdapterSpec(warmup_ratio=-inf), "warmup_ratio must be a finite number, got -inf"),
                          (lambda: ScratchGPTSpec(learning_rate=inf), "learning_rate must be a finite number"),
                          (lambda: PeftStudySpec(learning_rate=nan), "learning_rate must be a finite number"),
                          (lambda: CompressionSpec(heal_learning_rate=nan), "heal_learning_rate must be a finite")]:
        with pytest.raises(ValueError, match=message):
            make()
    for make in (lambda: AdapterTrainingConfig(max_minutes=nan), lambda: EvaluationConfig(regression_tolerance=inf)):
        with pytest.raises(pydantic.ValidationError, match="finite number"):
            make()


# --------------------------------------------------------------------------------------------- SIGKILL mid-training

TRAIN_SPEC = dict(quantization="nf4", lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=5e-3, max_minutes=0,
                  max_steps=8, batch_size=2, max_seq_len=512, eval_points=4, early_stopping_patience=0,
                  curve_answers_per_family=0, general_replay_share=0.0, max_train_samples=32,
                  max_val_samples=4, logging_steps=2, warmup_ratio=0.0)

TRAIN_CHILD = r"""
import json, sys, time
from pathlib import Path
from finpipe.instructions.samples import read_jsonl
from finpipe.training import sft
from finpipe.training.spec import AdapterSpec

base, data, job, target, ready, stall_at, spec = sys.argv[1:]
kind, _, where = stall_at.partition(":")

def stall():
    Path(ready).write_text(kind)
    time.sleep(600)

callbacks = []
if kind == "step":  # between two optimizer steps, mid-way through the run
    from transformers import TrainerCallback
    class StallAfterStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(where):
                stall()
    callbacks.append(StallAfterStep())
elif kind == "checkpoint":  # the checkpoint's adapter weights are on disk; optimizer, RNG and trainer state are not
    from transformers import Trainer
    save = Trainer._save_optimizer_and_scheduler
    def save_or_stall(self, output_dir):
        if Path(output_dir).name == where:
            stall()
        return save(self, output_dir)
    Trainer._save_optimizer_and_scheduler = save_or_stall
elif kind == "adapter":  # inside atomic_dir: the adapter is complete in its temp folder, not yet renamed into place
    size = sft.folder_size
    def size_or_stall(path):
        if Path(path).name.startswith(f".{Path(target).name}.tmp-"):
            stall()
        return size(path)
    sft.folder_size = size_or_stall
report = sft.train_adapter(base, read_jsonl(Path(data) / "train.jsonl"), read_jsonl(Path(data) / "val.jsonl"),
                           Path(job), Path(target), AdapterSpec(**json.loads(spec)), callbacks=callbacks)
print("trained", report.steps, report.resumed_from, flush=True)
"""


@pytest.fixture(scope="module")
def training_data(tmp_path_factory) -> Path:
    from finpipe.instructions.samples import write_jsonl
    from finpipe_tests.helpers import tiny_split

    folder = tmp_path_factory.mktemp("training_data")
    write_jsonl(tiny_split().train, folder / "train.jsonl")
    write_jsonl(tiny_split().val, folder / "val.jsonl")
    return folder


@pytest.fixture(scope="module")
def trained_adapter(tiny_base, training_data, tmp_path_factory) -> Path:
    """A finished adapter (2 steps), copied into each test's lake as the champion."""
    from finpipe.instructions.samples import read_jsonl
    from finpipe.training.sft import train_adapter
    from finpipe.training.spec import AdapterSpec

    root = tmp_path_factory.mktemp("previous")
    train_adapter(tiny_base, read_jsonl(training_data / "train.jsonl"), read_jsonl(training_data / "val.jsonl"),
                  root / "job", root / "adapter", AdapterSpec(**TRAIN_SPEC | {"max_steps": 2}), log=lambda *a: None)
    return root / "adapter"


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class TrainingJob:
    """The qlora_adapter layout in the test's lake: a champion ``run-1``, a job folder, a target ``run-2``."""

    def __init__(self, lake: Path, tmp_path: Path, tiny_base: Path, data: Path, previous: Path, children) -> None:
        from finpipe.models import registry

        self.tmp_path, self.base, self.data, self.children = tmp_path, tiny_base, data, children
        self.adapters = registry.adapters_dir(lake)
        self.previous = self.adapters / "run-1"
        shutil.copytree(previous, self.previous)
        payload = {"run_id": "run-1", "path": str(self.previous), "base": {"name": "tiny", "path": str(tiny_base)}}
        registry.write_pointer(registry.champion_pointer(lake), payload)
        registry.write_pointer(registry.latest_adapter_pointer(lake), payload)
        self.pointers = [registry.champion_pointer(lake), registry.latest_adapter_pointer(lake)]
        self.job, self.target = self.adapters / "_jobs" / "fingerprint", self.adapters / "run-2"
        self.snapshot = self.state()

    def state(self) -> dict:
        return {"previous": tree(self.previous), **{p.name: p.read_bytes() for p in self.pointers}}

    def kill_at(self, stall_at: str) -> None:
        ready, log = self.tmp_path / f"{stall_at}.ready", self.tmp_path / f"train-{stall_at}.log"
        child = spawn(self.children, TRAIN_CHILD, self.base, self.data, self.job, self.target, ready, stall_at,
                      json.dumps(TRAIN_SPEC), log=log)
        wait_for(ready, child, log)
        sigkill(child)
        assert "trained" not in tail(log)

    def rerun(self):
        from finpipe.instructions.samples import read_jsonl
        from finpipe.training.sft import train_adapter
        from finpipe.training.spec import AdapterSpec

        return train_adapter(self.base, read_jsonl(self.data / "train.jsonl"), read_jsonl(self.data / "val.jsonl"),
                             self.job, self.target, AdapterSpec(**TRAIN_SPEC), log=lambda *a: None)

    def temp_dirs(self) -> list[Path]:
        return sorted(self.adapters.glob(f".{self.target.name}.tmp-*"))  # with finpipe's marker beside each folder

    def adapter_folders(self) -> list[str]:
        """What a listing of the adapters folder offers as adapters: visible folders with an adapter_config.json."""
        return sorted(p.parent.name for p in self.adapters.glob("*/adapter_config.json")
                      if not p.parent.name.startswith("."))

    def assert_complete(self, report) -> None:
        assert report.steps >= TRAIN_SPEC["max_steps"]
        for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "training_report.json"):
            assert (self.target / name).is_file(), name
        assert json.loads((self.target / "training_report.json").read_text())["resumed_from"] == report.resumed_from
        assert self.state() == self.snapshot  # the champion and both pointers, byte for byte


@pytest.fixture
def training_job(isolated_lake, tmp_path, tiny_base, training_data, trained_adapter, children) -> TrainingJob:
    return TrainingJob(isolated_lake, tmp_path, tiny_base, training_data, trained_adapter, children)


def checkpoints(job: Path) -> dict[str, bool]:
    """checkpoint name -> complete (the Trainer writes trainer_state.json last)."""
    return {p.name: (p / "trainer_state.json").is_file() for p in sorted(job.glob("checkpoint-*"))}


def test_sigkill_mid_training_leaves_no_adapter_keeps_the_champion_and_the_rerun_resumes(training_job):
    training_job.kill_at("step:5")
    assert checkpoints(training_job.job) == {"checkpoint-2": True, "checkpoint-4": True}
    assert not training_job.target.exists() and training_job.temp_dirs() == []
    assert training_job.adapter_folders() == ["run-1"]
    assert training_job.state() == training_job.snapshot

    report = training_job.rerun()
    assert report.resumed_from == str(training_job.job / "checkpoint-4")
    assert report.steps == 8 and report.initial_eval_loss is None  # resumed, not restarted
    # one loss curve: the checkpoint's history, then the steps after it, none twice
    assert [step for step, _ in report.train_losses] == [2, 4, 6, 8]
    assert [step for step, _ in report.eval_losses][:4] == [2, 4, 6, 8]
    training_job.assert_complete(report)
    assert training_job.adapter_folders() == ["run-1", "run-2"]


def test_sigkill_while_a_checkpoint_is_written_resumes_from_the_last_complete_one(training_job):
    training_job.kill_at("checkpoint:checkpoint-6")
    # checkpoint-6 has its adapter weights but no optimizer, RNG or trainer state
    assert checkpoints(training_job.job) == {"checkpoint-2": True, "checkpoint-4": True, "checkpoint-6": False}
    assert (training_job.job / "checkpoint-6" / "adapter_model.safetensors").is_file()
    assert not training_job.target.exists() and training_job.state() == training_job.snapshot

    report = training_job.rerun()  # not from the half-written checkpoint-6 (the Trainer cannot load it)
    assert report.resumed_from == str(training_job.job / "checkpoint-4")
    assert report.steps == 8 and [step for step, _ in report.train_losses] == [2, 4, 6, 8]
    training_job.assert_complete(report)


def test_sigkill_while_the_adapter_is_moved_into_place_leaves_only_a_hidden_temp_folder_the_rerun_removes(
        training_job):
    from finpipe.models.files import WRITER_SUFFIX

    training_job.kill_at("adapter")
    assert not training_job.target.exists()
    leftover, marker = training_job.temp_dirs()  # the killed run's complete-looking adapter, under a hidden temp name
    assert marker.name == leftover.name + WRITER_SUFFIX  # and the marker naming its (dead) writer
    assert (leftover / "adapter_model.safetensors").is_file() and not (leftover / "training_report.json").exists()
    assert training_job.adapter_folders() == ["run-1"]  # never taken for an adapter
    assert training_job.state() == training_job.snapshot
    assert checkpoints(training_job.job)["checkpoint-8"]

    report = training_job.rerun()
    assert report.resumed_from == str(training_job.job / "checkpoint-8")  # training had finished: nothing repeated
    # transformers 5.x, resumed from the final checkpoint, runs one more optimizer step (at the cosine tail's
    # near-zero learning rate) before it stops; load_best_model_at_end then restores the best checkpoint
    assert report.steps in (8, 9) and [step for step, _ in report.train_losses][:4] == [2, 4, 6, 8]
    training_job.assert_complete(report)
    assert training_job.adapter_folders() == ["run-1", "run-2"]
    assert training_job.temp_dirs() == []  # the next write of the same folder removed what the killed one left
