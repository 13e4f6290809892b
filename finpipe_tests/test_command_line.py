"""The command-line entry points, run as a user runs them: separate processes on the test's own lake."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import duckdb
import pytest

from finpipe.models import registry
from finpipe.paths import LAKE_DB_NAME, REPO_ROOT
from finpipe_tests.helpers import free_port, stop_process_group

BIN = Path(sys.executable).parent


def run(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli_env(isolated_lake: Path, tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update(FINPIPE_LAKE_DIR=str(isolated_lake), DAGSTER_HOME=str(tmp_path / "dagster_home"),
               DAGSTER_DISABLE_TELEMETRY="1")
    (tmp_path / "dagster_home").mkdir()
    (tmp_path / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return env


def count_rows(lake_dir: Path) -> int:
    con = duckdb.connect(str(lake_dir / LAKE_DB_NAME), read_only=True)
    try:
        return con.execute("SELECT count(*) FROM prices").fetchall()[0][0]
    finally:
        con.close()


@pytest.mark.slow
def test_finpipe_run_quickstart_path_builds_lake_datasets_base_adapter_and_report(cli_env, isolated_lake):
    # the Quickstart command with a small training and evaluation budget (the defaults take ~12 min on 2 cores)
    # two years of history instead of the default thirteen keep the datasets and the test short
    done = run([str(BIN / "finpipe"), "run", "--start", "2011-03-02", "--max-steps", "4", "--eval-max-new-tokens", "12"],
               cli_env, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    # a quiet console: no library progress bars, no warnings, one short prefix ("HH:MM:SS step: ") per log line
    assert "it/s]" not in done.stderr and "%|" not in done.stderr, done.stderr[-3000:]
    assert "Warning" not in done.stderr and " - dagster - " not in done.stderr, done.stderr[-3000:]
    assert re.search(r"^\d\d:\d\d:\d\d qlora_adapter: training on ", done.stderr, re.M), done.stderr[-3000:]
    report = done.stdout.strip().splitlines()[-1]  # the run ends with the report's path
    assert report.startswith("report: ") and report.endswith("/evaluation/report.html")
    html = Path(report.removeprefix("report: ")).read_text()
    assert "<th>base</th><th>adapter</th>" in html and "validation loss" in html
    assert "promotion: promoted" in done.stdout  # the first adapter that beats the base becomes champion
    champion = json.loads((isolated_lake / "models/adapters/champion.json").read_text())
    assert f"lake: {isolated_lake / LAKE_DB_NAME}" in done.stdout
    assert f"train: {isolated_lake / 'datasets/split/train.jsonl'}" in done.stdout
    latest = registry.resolve_adapter(isolated_lake, "latest")
    assert f"adapter: {latest['path']}" in done.stdout, done.stdout[-3000:]
    assert "4 steps" in done.stdout
    assert champion["run_id"] == latest["run_id"]
    assert (Path(latest["path"]) / "adapter_model.safetensors").exists()
    assert latest["base"]["name"] == "SmolLM2-135M-Instruct"
    assert count_rows(isolated_lake) == 4 * 503  # NYSE sessions 2011-03-02..2013-03-01
    shell = run([str(BIN / "duckdb"), str(isolated_lake / LAKE_DB_NAME), "-csv", "select count(*) from prices"], cli_env)
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.split() == ["count_star()", "2012"]
    again = run([str(BIN / "finpipe"), "run", "--start", "2011-03-02", "--only-data"], cli_env)  # idempotent
    assert again.returncode == 0, again.stderr[-3000:]
    assert count_rows(isolated_lake) == 4 * 503


@pytest.mark.slow
def test_finpipe_run_only_lake_on_a_short_range(cli_env, isolated_lake):
    done = run([str(BIN / "finpipe"), "run", "--start", "2013-02-01", "--end", "2013-03-01", "--only-lake"], cli_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert count_rows(isolated_lake) == 4 * 20  # 20 NYSE sessions 2013-02-01..03-01 (Feb 18 closed)
    assert "datasets:" not in done.stdout


def test_the_cli_writes_dagster_history_without_fsync_and_other_processes_keep_the_default(cli_env, tmp_path):
    probe = ("import sqlalchemy, sys\n{prepare}"
             "engine = sqlalchemy.create_engine('sqlite:///' + sys.argv[1])\n"
             "with engine.connect() as c: print(c.exec_driver_sql('PRAGMA synchronous').scalar())\n")
    prepare = "from finpipe.cli.run import _prepare_dagster_home; _prepare_dagster_home()\n"
    cli = run([sys.executable, "-c", probe.format(prepare=prepare), str(tmp_path / "a.db")], cli_env)
    plain = run([sys.executable, "-c", probe.format(prepare=""), str(tmp_path / "b.db")], cli_env)
    assert (cli.stdout.strip(), plain.stdout.strip()) == ("0", "2"), cli.stderr + plain.stderr  # OFF vs FULL


def test_finpipe_run_reports_configuration_errors_in_one_line(cli_env):
    bad_universe = run([str(BIN / "finpipe"), "run", "--universe", "mars"], cli_env, timeout=120)
    assert bad_universe.returncode == 2
    assert "unknown universe 'mars'" in bad_universe.stderr
    reversed_range = run([str(BIN / "finpipe"), "run", "--start", "2013-03-01", "--end", "2013-02-01"], cli_env, timeout=120)
    assert reversed_range.returncode == 2
    assert "--end 2013-02-01 is before --start 2013-03-01" in reversed_range.stderr


@pytest.mark.slow
def test_dagster_asset_materialize_cli(cli_env, isolated_lake):
    done = run([str(BIN / "dagster"), "asset", "materialize", "-m", "finpipe.definitions",
                "--select", "daily_prices", "--partition-range", "2013-02-25...2013-03-01"], cli_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert count_rows(isolated_lake) == 20


@pytest.mark.slow
def test_dagster_dev_serves_the_assets_over_graphql(cli_env):
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO_ROOT, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, so the whole tree stops with it
    )
    query = json.dumps({"query": "{ assetNodes { assetKey { path } groupName } repositoriesOrError { "
                                 "... on RepositoryConnection { nodes { schedules { name cronSchedule "
                                 "executionTimezone scheduleState { status } } sensors { name } } } } }"}).encode()
    try:
        deadline = time.monotonic() + 120
        nodes = None
        while time.monotonic() < deadline and nodes is None:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=query,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=5) as response:
                    payload = json.load(response)
                nodes = payload["data"]["assetNodes"] or None  # empty while the code location loads
                repository = payload["data"]["repositoriesOrError"]["nodes"][0]
            except (OSError, KeyError, TypeError):
                pass
            if nodes is None:
                time.sleep(1)
        assert nodes, "dagster dev did not answer GraphQL within 120 s"
        assert {"path": ["daily_prices"]} in [n["assetKey"] for n in nodes]
        assert {n["groupName"] for n in nodes} == {"market_data", "statistics", "datasets", "models", "evaluation",
                                                  "scratch", "studies"}
        keys = {n["assetKey"]["path"][0] for n in nodes}
        assert {"price_statistics", "instruction_samples", "dataset_split", "base_model", "scratch_gpt",
                "qlora_adapter", "adapter_evaluation", "evaluation_report", "champion_adapter"} <= keys
        # the nightly schedule is visible and toggleable (off until switched on); the refresh sensor runs
        assert repository["schedules"] == [{"name": "nightly_schedule", "cronSchedule": "30 18 * * 1-5",
                                            "executionTimezone": "America/New_York",
                                            "scheduleState": {"status": "STOPPED"}}]
        assert {"name": "refresh_on_new_prices"} in repository["sensors"]
    finally:
        stop_process_group(proc)


def test_help_runs_and_sql_import_no_torch_pandas_or_dagster(lake):
    """The commands that only read or describe start instantly: none of them imports an ML library, pandas or
    Dagster (a cold `import transformers` alone is seconds on 2 cores)."""
    import subprocess
    import sys

    heavy = ("torch", "transformers", "peft", "pandas", "dagster")
    for argv in (["--help"], ["runs"], ["sql", "SELECT count(*) AS n FROM prices"]):
        probe = ("import sys\nfrom finpipe.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
                 "print('LOADED', sorted(m for m in %r if m in sys.modules))" % (argv, heavy))
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120).stdout
        assert "LOADED []" in out, (argv, out[-300:])


def test_a_heartbeat_says_a_silent_step_is_still_working_and_stops_with_it():
    import time

    from finpipe.runtime import heartbeat

    lines: list[str] = []
    with heartbeat(lines.append, "converting SmolLM2", every_s=0.05):
        time.sleep(0.23)
    said = len(lines)
    assert 2 <= said <= 5 and all(line.startswith("converting SmolLM2: still working (") for line in lines), lines
    time.sleep(0.15)
    assert len(lines) == said  # nothing after the step ended
    with heartbeat(lines.append, "quick", every_s=10):
        pass
    assert len(lines) == said  # a step shorter than the interval says nothing
