"""Dagster steps on a real distributed executor: dagster-celery's workers behind Debian's redis-server.

The distributed twin of the multiprocess test in test_scale_out_and_security.py. A module fixture starts a
redis-server on a free loopback port (no persistence) and two Celery workers the way deploy/dagster-celery.yaml tells
an operator to (``dagster-celery worker start -A dagster_celery.app -y deploy/dagster-celery.yaml``, one step at a time
each), sharing one DAGSTER_HOME with the test: sqlite storage on this one host, otherwise the instance config of
deploy/dagster-celery-instance.yaml (the ``finpipe_lake`` pool, one step at a time). Only the broker URL differs from
deploy/ (it comes from the environment there too). The fixture stops everything it started, process group by process
group. Without redis-server the tests skip, or fail where FINPIPE_REQUIRE_SERVICES=1 (.ci/run installs it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from finpipe.defs.partitions import PARTITION_RANGE_END_TAG, PARTITION_RANGE_START_TAG
from finpipe.defs.resources import LAKE_WRITER_POOL
from finpipe_tests.test_scale_out_and_security import (
    DEPLOY,
    LAKE_WRITER_STEPS,
    PRICE_RANGE,
    REPO_ROOT,
    SCALE_OUT_ASSETS,
    _in_flight,
    _lake_contents,
    _run_config,
    _scale_out_resources,
    _tiny_model_folder,
    scale_out_checks,
)

#: dagster-celery's marker of a step's queue wait: starts where the run submits the step, ends where a worker takes it
DELEGATED = "celery_queue_wait"
CELERY_YAML = DEPLOY / "dagster-celery.yaml"
INSTANCE_YAML = DEPLOY / "dagster-celery-instance.yaml"
WORKERS = ("w1", "w2")
WORKER_START_S = 120  # both workers answer a ping within this (they import dagster on a loaded 2-core machine)
RUN_S = 240  # a run that takes longer fails the test (a run whose steps no worker takes would wait forever)
#: in a worker started with this variable (a folder), the next daily_prices step that finds <folder>/stall-ingest
#: takes it, writes its pid to <folder>/ingest.ready from inside the lake's write transaction and waits to be killed
FAULTS_ENV = "FINPIPE_TEST_CELERY_FAULTS"
#: a short training on the tiny model (seconds): the qlora_adapter step through a worker
TRAIN = {"quantization": "none", "max_minutes": 0, "max_steps": 2, "eval_points": 1, "max_val_samples": 4,
         "max_train_samples": 16, "batch_size": 4, "max_seq_len": 512, "early_stopping_patience": 0,
         "curve_answers_per_family": 0, "logging_steps": 1}


# ------------------------------------------------------------------------------------------------ the job

def celery_lineage_job() -> dg.JobDefinition:
    """The scale-out assets and the training, run by dagster-celery's executor with deploy/'s config (what
    deploy/celery_code_location.py configures). Module-level: every worker rebuilds it (dg.reconstructable)."""
    from dagster_celery import celery_executor

    from finpipe.defs.models import qlora_adapter

    config = yaml.safe_load(CELERY_YAML.read_text())["execution"]["config"]
    assets = [*SCALE_OUT_ASSETS, qlora_adapter]
    defs = dg.Definitions(
        assets=assets, asset_checks=scale_out_checks(), resources=_scale_out_resources(),
        jobs=[dg.define_asset_job("celery_lineage", selection=dg.AssetSelection.assets(*assets),
                                  executor_def=celery_executor.configured(config, name="finpipe_celery_executor"))])
    return defs.resolve_job_def("celery_lineage")


def _stall_inside_the_ingest_transaction(faults: Path) -> None:
    """Fault injection in the worker (as test_fault_injection.py does in its children): the stall is faked, the kill
    is the fault. The last call inside write_batch's transaction (COMMIT is next) waits once, when armed."""
    from finpipe.market.lake import PriceLake

    register = PriceLake._register_instruments

    def stall(con, universe, batch):
        register(con, universe, batch)
        with contextlib.suppress(FileNotFoundError):  # armed: the first attempt takes the flag, a retry passes
            (faults / "stall-ingest").rename(faults / "stall-ingest.taken")
            (faults / "ingest.ready").write_text(str(os.getpid()))
            time.sleep(600)

    PriceLake._register_instruments = staticmethod(stall)


if os.environ.get(FAULTS_ENV):
    _stall_inside_the_ingest_transaction(Path(os.environ[FAULTS_ENV]))


# ------------------------------------------------------------------------------------------------ the services

def _unavailable(reason: str):
    """CI installs redis-server and sets FINPIPE_REQUIRE_SERVICES=1: a missing one fails there instead of skipping."""
    if os.environ.get("FINPIPE_REQUIRE_SERVICES") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def _stop(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """The process and everything it started (its own session): TERM, then KILL. `dagster-celery worker start` is a
    wrapper whose celery child (and that one's pool processes) would outlive a signal to the wrapper alone."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                proc.wait(timeout=10)
                return
            proc.poll()
            time.sleep(0.2)


def _instance_yaml(home: Path) -> Path:
    """deploy/'s instance config on this one host: its sqlite storage instead of the shared Postgres."""
    config = yaml.safe_load(INSTANCE_YAML.read_text())
    del config["storage"]  # the default: sqlite under DAGSTER_HOME, which the workers share on this host
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return home


class CeleryCluster:
    def __init__(self, root: Path, broker: str, env: dict, faults: Path) -> None:
        self.root, self.broker, self.env, self.faults = root, broker, env, faults
        self.home = root / "dagster_home"
        self.procs: dict[str, subprocess.Popen] = {}

    def start_worker(self, name: str) -> None:
        log = open(self.root / f"worker-{name}.log", "ab")
        argv = [str(Path(sys.executable).with_name("dagster-celery")), "worker", "start", "-A", "dagster_celery.app",
                "-y", str(CELERY_YAML), "-n", name, "-l", "INFO", "--", "--concurrency=1"]
        self.procs[name] = subprocess.Popen(argv, cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        log.close()

    def app(self):
        from dagster_celery.cli import get_validated_config
        from dagster_celery.executor import CeleryExecutor
        from dagster_celery.make_app import make_app

        config = get_validated_config(str(CELERY_YAML))  # the workers' view of the file, the broker resolved
        config.pop("retries")  # Dagster's, not Celery's
        return make_app(CeleryExecutor.for_cli(**config).app_args())

    def wait_for_workers(self, timeout: float = WORKER_START_S) -> set[str]:
        app, deadline, answered = self.app(), time.monotonic() + timeout, set()
        wanted = {f"{name}@{socket.gethostname()}" for name in WORKERS}
        while not wanted <= answered:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    pytest.fail(f"celery worker {name} exited with {proc.returncode}:\n{self.log(name)}")
            if time.monotonic() > deadline:
                pytest.fail(f"celery workers {sorted(wanted - answered)} did not answer within {timeout:.0f} s:\n"
                            + "\n".join(self.log(n) for n in WORKERS))
            answered |= {host for reply in app.control.ping(timeout=1.0) for host in reply}
        return answered

    def log(self, name: str) -> str:
        return f"--- worker {name}\n{_tail(self.root / f'worker-{name}.log')}"

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.home))


@pytest.fixture(scope="module")
def celery_cluster(tmp_path_factory):
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        _unavailable("redis-server is not installed (apt-get install redis-server); the Celery workers need a broker")
    if shutil.which("celery", path=str(Path(sys.executable).parent)) is None:
        _unavailable("celery is not installed in this environment (pip install -e '.[dev]')")
    root = tmp_path_factory.mktemp("celery")
    port = _free_port()
    redis_log = root / "redis.log"
    with open(redis_log, "wb") as out:
        redis = subprocess.Popen([redis_server, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                  "--appendonly", "no", "--protected-mode", "yes", "--dir", str(root)],
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    cluster, broker_before = None, os.environ.get("DAGSTER_CELERY_BROKER_URL")
    try:
        import redis as redis_client

        client, deadline = redis_client.Redis(host="127.0.0.1", port=port, socket_timeout=1), time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis_client.ConnectionError:
                if redis.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not start on 127.0.0.1:{port}:\n{_tail(redis_log)}")
                time.sleep(0.1)
        client.close()
        broker = f"redis://127.0.0.1:{port}/0"
        faults = root / "faults"
        faults.mkdir()
        (root / "dagster_home").mkdir()
        home = _instance_yaml(root / "dagster_home")
        env = os.environ | {
            "DAGSTER_HOME": str(home),
            "DAGSTER_CELERY_BROKER_URL": broker,  # deploy/dagster-celery.yaml reads the broker from here
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the wrapper runs `celery`
            "FINPIPE_LAKE_DIR": str(root / "default_lake"),  # never the repo's data_lake/ (each run names its lake)
            FAULTS_ENV: str(faults),
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        cluster = CeleryCluster(root, broker, env, faults)
        cluster.instance().dispose()  # its sqlite storage created once, before two workers would race to create it
        os.environ["DAGSTER_CELERY_BROKER_URL"] = broker  # the executor in the test process resolves it too
        for name in WORKERS:
            cluster.start_worker(name)
        cluster.wait_for_workers()
        yield cluster
    finally:
        _close_celery_clients()
        os.environ.pop("DAGSTER_CELERY_BROKER_URL", None)
        if broker_before is not None:
            os.environ["DAGSTER_CELERY_BROKER_URL"] = broker_before
        for proc in (cluster.procs.values() if cluster else []):
            _stop(proc)
        _stop(redis, grace_s=5)


def _close_celery_clients() -> None:
    """The Celery apps of this process (dagster-celery makes one per run and leaves its result consumer open) closed
    while the broker still runs: otherwise they try to reach it once more when the test process exits."""
    from celery._state import _get_active_apps

    for app in list(_get_active_apps()):
        consumer = getattr(app._backend, "result_consumer", None)  # the backend only where one was made
        if getattr(consumer, "_connection", None) is not None:
            with contextlib.suppress(Exception):
                consumer.stop()
        if app._pool is not None:
            app._pool.force_close_all()
        app.close()


@contextlib.contextmanager
def _deadline(seconds: int, what: str):
    """A run through the workers that takes longer than this fails the test instead of waiting forever."""
    def expired(signum, frame):
        raise TimeoutError(f"{what} did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _execute(cluster: CeleryCluster, lake_dir: Path, base_dir: Path, train: bool = True):
    tags = {PARTITION_RANGE_START_TAG: PRICE_RANGE[0], PARTITION_RANGE_END_TAG: PRICE_RANGE[1]}
    run_config = _run_config(lake_dir, base_dir)
    if train:
        run_config["ops"]["qlora_adapter"] = {"config": TRAIN}
    instance = cluster.instance()
    with _deadline(RUN_S, "the run through the celery workers"):
        selection = None if train else [k for a in SCALE_OUT_ASSETS for k in a.keys]
        result = dg.execute_job(dg.reconstructable(celery_lineage_job), instance=instance, tags=tags,
                                run_config=run_config, asset_selection=selection)
    return instance, result


@pytest.fixture(scope="module")
def in_process_lake(tmp_path_factory) -> tuple[Path, Path]:
    """The same assets materialized in this process: the lake and datasets a distributed run must reproduce."""
    root = tmp_path_factory.mktemp("in_process")
    base_dir = _tiny_model_folder(root / "tiny_base")
    tags = {PARTITION_RANGE_START_TAG: PRICE_RANGE[0], PARTITION_RANGE_END_TAG: PRICE_RANGE[1]}
    result = dg.materialize([*SCALE_OUT_ASSETS, *scale_out_checks()], resources=_scale_out_resources(str(root / "lake")),
                            tags=tags, run_config={"ops": _run_config(root / "lake", base_dir)["ops"]})
    assert result.success
    return root / "lake", base_dir


def _step_failures(records) -> list[str]:
    return [r.dagster_event.event_specific_data.error.to_string() for r in records
            if r.dagster_event and r.dagster_event.event_type == dg.DagsterEventType.STEP_FAILURE]


def _celery_hosts(events) -> dict[str, list[str]]:
    """step key -> the Celery workers (hostnames) that executed it, in order."""
    hosts: dict[str, list[str]] = {}
    for e in events:
        if e.event_type == dg.DagsterEventType.ENGINE_EVENT and e.engine_event_data.marker_end == DELEGATED:
            hosts.setdefault(e.step_key, []).append(e.engine_event_data.metadata["Celery worker"].value)
    return hosts


def _submitted(event) -> bool:
    return (event.event_type == dg.DagsterEventType.ENGINE_EVENT
            and event.engine_event_data.marker_start == DELEGATED)


def _worker_logs(cluster: CeleryCluster) -> str:
    return "\n".join(cluster.log(name) for name in WORKERS)


def _assert_lake_writers_one_at_a_time(instance: dg.DagsterInstance, records) -> None:
    """From the submission of one lake writer to the success of the other, across the workers: the instance's
    finpipe_lake pool (limit 1), whose slot the run claims before it submits the step; none is left claimed."""
    spans = _in_flight(records, launched_by=_submitted)
    overlap = lambda a, b: spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]  # noqa: E731
    writers = sorted(LAKE_WRITER_STEPS)
    assert not any(overlap(a, b) for i, a in enumerate(writers) for b in writers[i + 1:]), spans
    pool = instance.event_log_storage.get_concurrency_info(LAKE_WRITER_POOL)
    assert pool.slot_count == 1 and not pool.claimed_slots and not pool.pending_steps


def _assert_same_lake(lake_dir: Path, reference: Path) -> None:
    distributed, serial = _lake_contents(lake_dir), _lake_contents(reference)
    assert distributed["files"] == serial["files"]  # samples and split byte for byte: the same dataset hashes
    for table, frame in distributed["tables"].items():
        assert frame.height > 0 and frame.equals(serial["tables"][table]), table


# ------------------------------------------------------------------------------------------------ the tests

def test_celery_workers_run_the_lineage_and_a_training_but_never_two_lake_writers(celery_cluster, in_process_lake,
                                                                                  tmp_path, capsys):
    reference, base_dir = in_process_lake
    started = time.monotonic()
    instance, result = _execute(celery_cluster, tmp_path / "lake", base_dir)
    wall_s = time.monotonic() - started
    records = instance.all_logs(result.run_id)
    assert result.success, _step_failures(records) + [_worker_logs(celery_cluster)]
    events = [r.dagster_event for r in records if r.dagster_event]
    starts = {e.step_key: e.pid for e in events if e.event_type == dg.DagsterEventType.STEP_START}
    assert {a.key.to_user_string() for a in SCALE_OUT_ASSETS} | {"qlora_adapter"} <= set(starts)
    # every step in a worker's pool process, none in the run's (this) process; both workers took steps
    run_pids = {e.pid for e in events if e.event_type == dg.DagsterEventType.RUN_START}
    assert run_pids == {os.getpid()} and os.getpid() not in set(starts.values())
    hosts = _celery_hosts(events)
    assert set(hosts) == set(starts)
    assert {h.split("@")[0] for hs in hosts.values() for h in hs} == set(WORKERS), hosts

    _assert_lake_writers_one_at_a_time(instance, records)
    # ...while other steps ran beside them on the other worker
    running = _in_flight(records, launched_by=lambda e: e.event_type == dg.DagsterEventType.STEP_START)
    beside = lambda a, b: running[a][0] < running[b][1] and running[b][0] < running[a][1]  # noqa: E731
    assert any(beside("base_model", w) for w in LAKE_WRITER_STEPS), running

    # the short training, in a worker, on the split the lineage wrote there
    adapter = {k: v.value for k, v in result.asset_materializations_for_node("qlora_adapter")[0].metadata.items()}
    assert adapter["steps"] == TRAIN["max_steps"] and Path(adapter["path"], "adapter_config.json").exists()
    assert Path(adapter["path"]).is_relative_to(tmp_path / "lake")
    # the same lake rows and dataset files as the in-process run
    _assert_same_lake(tmp_path / "lake", reference)
    with capsys.disabled():
        print(f"\n[celery] lineage + training through 2 workers: {wall_s:.1f} s; steps per worker "
              f"{ {w: sum(h.startswith(w) for hs in hosts.values() for h in hs) for w in WORKERS} }")


def test_a_worker_killed_inside_the_ingest_transaction_leaves_a_sound_lake_and_the_step_runs_again(
        celery_cluster, in_process_lake, tmp_path, monkeypatch, capsys):
    """SIGKILL of the worker process that executes daily_prices, inside the lake's write transaction. Celery
    (deploy/'s task_acks_late + task_reject_on_worker_lost) puts the step back on the queue, a live worker process
    runs it again and the run succeeds; the killed attempt left nothing in the lake."""
    from finpipe import cli

    reference, base_dir = in_process_lake
    faults = celery_cluster.faults
    for leftover in ("stall-ingest.taken", "ingest.ready"):
        (faults / leftover).unlink(missing_ok=True)
    (faults / "stall-ingest").write_text("armed")
    killed: list[int] = []
    done = threading.Event()

    def kill_when_ready():
        while not done.is_set():
            if (faults / "ingest.ready").exists():
                pid = int((faults / "ingest.ready").read_text())
                os.kill(pid, signal.SIGKILL)  # the pool process executing daily_prices, COMMIT not yet sent
                killed.append(pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_ready, daemon=True)
    killer.start()
    started = time.monotonic()
    try:
        instance, result = _execute(celery_cluster, tmp_path / "lake", base_dir, train=False)
    finally:
        done.set()
        killer.join(timeout=5)
    wall_s = time.monotonic() - started
    records = instance.all_logs(result.run_id)
    events = [r.dagster_event for r in records if r.dagster_event]
    assert killed, "the daily_prices step never reached the ingest transaction"
    full_logs = "".join((celery_cluster.root / f"worker-{name}.log").read_text(errors="replace") for name in WORKERS)
    assert f"pid:{killed[0]} exited with 'signal 9 (SIGKILL)'" in full_logs  # Celery saw its worker process die...
    # ...and the run did not fail: the step went back to the queue and ran again
    assert result.success, _step_failures(records) + [_worker_logs(celery_cluster)]
    attempts = [e.pid for e in events if e.event_type == dg.DagsterEventType.STEP_START and e.step_key == "daily_prices"]
    assert attempts[0] == killed[0] and len(attempts) == 2 and attempts[1] != killed[0], attempts
    assert not _step_failures(records)
    _assert_lake_writers_one_at_a_time(instance, records)  # the retry kept the pool slot: still no two writers

    monkeypatch.setenv("FINPIPE_LAKE_DIR", str(tmp_path / "lake"))
    capsys.readouterr()
    assert cli.main(["lake", "check"]) == 0, capsys.readouterr().out  # `finpipe lake check`
    assert "ok (" in capsys.readouterr().out
    _assert_same_lake(tmp_path / "lake", reference)  # the killed attempt left no row; the retry wrote them all
    with capsys.disabled():
        retried_by = _celery_hosts(events)["daily_prices"]
        print(f"\n[celery] killed pid {killed[0]} inside the ingest transaction; daily_prices ran on {retried_by} "
              f"(pids {attempts}); run succeeded in {wall_s:.1f} s")
