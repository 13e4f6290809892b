"""MLflow tracking (finpipe.tracking): off, MLflow is never imported; on, a real `mlflow server` on loopback receives
each adapter's run (parameters, metric history, the dataset, artifacts), a registered version per adapter and the
@champion alias that follows promotion; a server that is down fails nothing, is said once and recorded."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from finpipe.paths import REPO_ROOT
from finpipe_tests.helpers import free_port, stop_process_group

# the tiny lineage of test_evaluation_and_promotion: a 2-layer base, 8 steps (a training loss at each), one-token
# answers (promotion is decided by the golden loss, deterministically)
EVAL = {"golden_per_family": 2, "loss_samples": 14, "max_new_tokens": 1}
TRAIN = {"quantization": "none", "max_minutes": 0, "max_steps": 8, "eval_points": 2, "max_val_samples": 8,
         "max_train_samples": 96, "batch_size": 4, "learning_rate": 5e-3, "max_seq_len": 512,
         "early_stopping_patience": 0, "curve_answers_per_family": 1, "logging_steps": 1}
SERVER_START_TIMEOUT_S = 120


# ------------------------------------------------------------------------------------------ tracking off

def test_with_tracking_off_mlflow_is_never_imported():
    """The Quickstart's path (definitions, resources, the CLI's parser and options) in a fresh interpreter: mlflow
    stays out of sys.modules; and finpipe imports mlflow only inside finpipe.tracking's functions."""
    program = """
import sys
import finpipe.definitions
from finpipe.cli import build_parser
from finpipe.cli.run import tracking_from_options
from finpipe.defs.resources import build_resources

args = build_parser().parse_args(["run"])
assert not tracking_from_options(args).enabled
tracking = build_resources()["tracking"]
assert not tracking.enabled and not tracking.spec().enabled
print(sorted(m for m in sys.modules if m == "mlflow" or m.startswith(("mlflow.", "mlflow_"))))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FINPIPE_MLFLOW", "MLFLOW_"))}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=240, env=env,
                          cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"

    for path in (REPO_ROOT / "finpipe").rglob("*.py"):
        tree = ast.parse(path.read_text())
        top_level = set(map(id, tree.body))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                where = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
                assert path.name == "tracking.py" and id(node) not in top_level, where


def test_the_settings_reach_the_resource_from_the_environment_and_the_command_line(monkeypatch, isolated_lake):
    from finpipe.cli import build_parser
    from finpipe.cli.run import tracking_from_options
    from finpipe.defs.resources import build_resources
    from finpipe.tracking import TrackingSpec, default_tracking_uri, shown_uri, tracking_uri

    assert TrackingSpec.from_env({}) == TrackingSpec()
    spec = TrackingSpec.from_env({"FINPIPE_MLFLOW": "yes", "MLFLOW_TRACKING_URI": "http://mlflow:5000",
                                  "FINPIPE_MLFLOW_TIMEOUT_S": "3"})
    assert (spec.enabled, spec.tracking_uri, spec.timeout_s) == (True, "http://mlflow:5000", 3.0)
    assert TrackingSpec.from_env({"FINPIPE_MLFLOW_TRACKING_URI": "sqlite:///x.db",
                                  "MLFLOW_TRACKING_URI": "http://other"}).tracking_uri == "sqlite:///x.db"
    with pytest.raises(ValueError, match="FINPIPE_MLFLOW: expected true or false"):
        TrackingSpec.from_env({"FINPIPE_MLFLOW": "maybe"})
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        TrackingSpec(timeout_s=0)
    # the default store: SQLite and an artifact folder, both inside the lake
    assert tracking_uri(TrackingSpec(enabled=True), isolated_lake) == \
        f"sqlite:///{isolated_lake.resolve()}/mlflow/mlflow.db" == default_tracking_uri(isolated_lake)
    assert shown_uri("http://me:secret@host:5000/x") == "http://me:***@host:5000/x"

    # `finpipe run --mlflow`: the environment the step processes read, then the resource they build
    assert not build_resources()["tracking"].enabled
    tracking_from_options(build_parser().parse_args(["run", "--mlflow"]))
    assert os.environ["FINPIPE_MLFLOW"] == "1" and build_resources()["tracking"].enabled
    monkeypatch.delenv("FINPIPE_MLFLOW")
    tracking_from_options(build_parser().parse_args(["run", "--mlflow-tracking-uri", "http://u:pw@127.0.0.1:1"]))
    resource = build_resources()["tracking"]
    assert resource.enabled and "pw" not in repr(resource)  # the URI is referenced by name, resolved at run time
    assert resource.process_config_and_initialize().spec().tracking_uri == "http://u:pw@127.0.0.1:1"


def test_the_default_store_keeps_runs_in_sqlite_and_artifacts_in_the_lake_and_finpipe_ui_serves_them(
        isolated_lake, tmp_path):
    from mlflow import MlflowClient

    from finpipe.tracking import TrackingSpec, TrainingRecord, log_training, read_link, tracking_uri

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    train = tmp_path / "train.jsonl"
    train.write_text("{}\n")
    record = TrainingRecord("r1", adapter, {"lora_r": 4}, {"train_losses": [[1, 2.0], [2, 1.0]], "steps": 2}, "tiny",
                            "finpipe-train", train, "0123456789abcdef", 1, "dagster-run", "none", "0.1.0")
    spec = TrackingSpec(enabled=True)
    said: list[str] = []
    outcome = log_training(spec, isolated_lake, record, warn=said.append)
    assert not said and not outcome.missing and outcome.model_version == "1"
    assert (isolated_lake / "mlflow/mlflow.db").is_file()
    assert (isolated_lake / f"mlflow/artifacts/{outcome.run_id}/artifacts/adapter/adapter_config.json").is_file()
    assert read_link(adapter)["run_id"] == outcome.run_id
    client = MlflowClient(tracking_uri(spec, isolated_lake))
    assert [(m.step, m.value) for m in client.get_metric_history(outcome.run_id, "train_loss")] == [(1, 2.0), (2, 1.0)]
    assert not (Path.cwd() / "mlruns").exists()

    # `finpipe ui --mlflow` serves the lake's store: its runs, their artifacts and the registry through MLflow's API
    port = free_port()
    command = [sys.executable, "-m", "finpipe.cli", "ui", "--mlflow", "--port", str(port)]
    with serving(command, port, tmp_path / "ui.log", env=os.environ | {"FINPIPE_LAKE_DIR": str(isolated_lake)}) as ui:
        served = MlflowClient(ui.uri)
        assert served.get_run(outcome.run_id).data.params == {"lora_r": "4"}
        assert {a.path for a in served.list_artifacts(outcome.run_id, "adapter")} == {"adapter/adapter_config.json"}
        assert served.get_model_version("finpipe-adapter", "1").run_id == outcome.run_id
    assert f"MLflow's UI on sqlite:///{isolated_lake.resolve()}/mlflow/mlflow.db" in (tmp_path / "ui.log").read_text()


# ------------------------------------------------------------------------------------------ a real server

@dataclasses.dataclass
class Server:
    uri: str
    log: Path


@contextlib.contextmanager
def serving(command: list[str], port: int, log: Path, env: dict | None = None):
    """``command`` (an MLflow server on 127.0.0.1:``port``) in its own process group until /health answers; the whole
    group is stopped afterwards."""
    env = (env or os.environ) | {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent,
                                   start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{' '.join(command[:4])} did not start in {SERVER_START_TIMEOUT_S} s:\n"
                            f"{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield Server(uri, log)
    finally:
        stop_process_group(process)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 (a free port, SQLite store and artifacts in a temp folder)."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
               str(root / "artifacts"), "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"]
    with serving(command, port, root / "server.log") as server:
        yield server


def _resources(lake_resources, **tracking):
    from finpipe.defs.resources import HuggingFaceResource, TrackingResource

    return lake_resources() | {"huggingface": HuggingFaceResource(), "tracking": TrackingResource(**tracking)}


def _meta(result, node: str) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node(node)[0].metadata.items()}


def _lake_with_datasets(resources) -> None:
    from finpipe_tests.helpers import derive, ingest

    ingest(resources)
    assert derive(resources).success


def test_a_real_mlflow_server_holds_each_adapters_run_version_and_the_champion_alias(
        mlflow_server, lake_resources, isolated_lake, tiny_base):
    from mlflow import MlflowClient

    from finpipe import __version__
    from finpipe.definitions import in_groups
    from finpipe.defs.evaluation import adapter_evaluation, champion_adapter
    from finpipe.defs.models import AdapterTrainingConfig, qlora_adapter
    from finpipe.market.lake import PriceLake
    from finpipe.models import registry
    from finpipe.training.spec import AdapterSpec

    resources = _resources(lake_resources, enabled=True, tracking_uri=mlflow_server.uri)
    _lake_with_datasets(resources)
    ops = {"base_model": {"config": {"model": str(tiny_base)}}, "qlora_adapter": {"config": TRAIN},
           "adapter_evaluation": {"config": EVAL}}
    first = dg.materialize(in_groups("models", "evaluation"), resources=resources, raise_on_error=False,
                           run_config={"ops": ops})
    assert first.success
    training, evaluation, report, promotion = (_meta(first, n) for n in (
        "qlora_adapter", "adapter_evaluation", "evaluation_report", "champion_adapter"))
    assert promotion["promoted"] is True
    run_id = training["mlflow_run_id"]
    for step in (training, evaluation, report, promotion):  # every step logged into the adapter's run, fully
        assert step["mlflow_run_id"] == run_id and "mlflow_missing" not in step, step
    assert training["mlflow_run"] == f"{mlflow_server.uri}/#/experiments/{training['mlflow_run'].split('/')[-3]}" \
                                     f"/runs/{run_id}" == report["mlflow_run"]

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == training["run_id"]
    # tags: the Dagster run, the code version, the lake snapshot (none before the first `finpipe run` ends)
    tags = run.data.tags
    assert tags["dagster.run_id"] == first.run_id and tags["finpipe.run_id"] == training["run_id"]
    assert tags["finpipe.code_version"].startswith(__version__) and tags["finpipe.lake_snapshot"] == "none"
    assert tags["finpipe.promotion"] == "champion"
    # parameters: the AdapterSpec, every field (as the run config gave it: the config class coerces 0 to 0.0)
    assert run.data.params == {k: str(v) for k, v in AdapterTrainingConfig(**TRAIN).model_dump().items()}
    assert set(run.data.params) == {f.name for f in dataclasses.fields(AdapterSpec)} | {"warm_start"}
    # metric history: per-step losses and the learning curve, at their steps, as training reported them
    saved = json.loads((Path(training["path"]) / "training_report.json").read_text())
    history = lambda key: [(m.step, round(m.value, 6)) for m in client.get_metric_history(run_id, key)]  # noqa: E731
    assert history("train_loss") == [(s, round(v, 6)) for s, v in saved["train_losses"]] and len(saved["train_losses"]) > 1
    assert history("val_loss") == [(s, round(v, 6)) for s, v in saved["eval_losses"]]
    assert [s for s, _ in history("curve/val_loss")] == [p["step"] for p in saved["curve"]] and len(saved["curve"]) > 1
    # the strict metrics with their intervals, as evaluation.json has them
    record = json.loads(Path(evaluation["path"]).read_text())
    golden = record["variants"]["adapter"]["golden"]
    metrics = run.data.metrics
    for metric in ("number_correctness", "label_correctness", "exact_match"):
        assert metrics[f"adapter/golden/{metric}"] == golden["overall"][metric]
        assert [metrics[f"adapter/golden/{metric}_ci_low"], metrics[f"adapter/golden/{metric}_ci_high"]] == \
            golden["ci"][metric]
    assert metrics["adapter/val_loss"] == evaluation["adapter_val_loss"]
    # the training split as a dataset input, with the digest split.json records
    split = json.loads((isolated_lake / "datasets/split/split.json").read_text())
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == split["files"]["train"]["sha256"]
    assert {t.key: t.value for t in dataset_input.tags} == {"mlflow.data.context": "train"}
    # artifacts: the adapter folder, evaluation.json, the report, the model card
    listed = lambda path=None: {a.path for a in client.list_artifacts(run_id, path)}  # noqa: E731
    assert {"adapter", "evaluation", "report", "model_card.md"} <= listed()
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/training_report.json"} <= \
        listed("adapter")
    assert listed("evaluation") == {"evaluation/evaluation.json"}
    assert {"report/report.html", "report/report.md"} <= listed("report"), listed("report")
    card = Path(client.download_artifacts(run_id, "model_card.md", str(isolated_lake.parent)))
    assert f"run `{training['run_id']}`" in card.read_text() and "Run registry status: champion" in card.read_text()
    # the registered version carries @champion; the lake's run registry names the MLflow run
    champion = client.get_model_version_by_alias("finpipe-adapter", "champion")
    assert (champion.version, champion.run_id) == (training["mlflow_model_version"], run_id)
    assert champion.source == f"runs:/{run_id}/adapter"
    runs = registry.RunRegistry(PriceLake(isolated_lake / "finpipe.duckdb")).runs()
    assert dict(zip(runs["run_id"], runs["mlflow_run_id"])) == {training["run_id"]: run_id}

    # a weaker challenger (2 steps): its own run and version, refused; the alias stays on the champion's version
    worse = {"qlora_adapter": {"config": TRAIN | {"learning_rate": 3e-3, "max_steps": 2, "eval_points": 1}},
             "adapter_evaluation": {"config": EVAL}}
    second = dg.materialize([qlora_adapter, adapter_evaluation, champion_adapter], resources=resources,
                            raise_on_error=False, run_config={"ops": worse})
    assert second.success
    refused = _meta(second, "champion_adapter")
    assert refused["promoted"] is False, refused["reason"]
    challenger = _meta(second, "qlora_adapter")
    assert challenger["mlflow_run_id"] != run_id and challenger["mlflow_model_version"] == "2"
    assert client.get_model_version_by_alias("finpipe-adapter", "champion").version == champion.version
    assert client.get_model_version("finpipe-adapter", "2").tags["finpipe.status"] == "rejected"
    assert client.get_model_version("finpipe-adapter", champion.version).tags["finpipe.status"] == "champion"
    assert client.get_run(challenger["mlflow_run_id"]).data.tags["finpipe.promotion"] == "rejected"
    assert registry.read_pointer(registry.champion_pointer(isolated_lake))["run_id"] == training["run_id"]


def test_a_tracking_server_that_is_down_fails_nothing_is_said_once_and_recorded(lake_resources, isolated_lake,
                                                                               tiny_base):
    from finpipe.definitions import in_groups
    from finpipe.models import registry
    from finpipe.tracking import read_link

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    resources = _resources(lake_resources, enabled=True, tracking_uri=closed, timeout_s=2.0)
    _lake_with_datasets(resources)
    ops = {"base_model": {"config": {"model": str(tiny_base)}}, "qlora_adapter": {"config": TRAIN},
           "adapter_evaluation": {"config": EVAL}}
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(in_groups("models", "evaluation"), resources=resources, raise_on_error=False,
                            run_config={"ops": ops}, instance=instance)
    assert result.success
    said = [e.user_message for e in instance.all_logs(result.run_id)
            if e.level == logging.WARNING and "MLflow" in (e.user_message or "")]
    assert len(said) == 1 and "Connection refused" in said[0] and closed in said[0], said
    training = _meta(result, "qlora_adapter")
    assert training["mlflow_missing"] == ["run", "parameters", "metrics", "dataset", "artifacts", "model version"]
    assert "Connection refused" in training["mlflow_error"] and "mlflow_run_id" not in training
    for node, missing in (("adapter_evaluation", "evaluation"), ("evaluation_report", "report"),
                          ("champion_adapter", "promotion")):
        step = _meta(result, node)
        assert step["mlflow_missing"] == [missing] and "Connection refused" in step["mlflow_error"], (node, step)
    # the pipeline's own records are whole: the champion was promoted, and the adapter says what MLflow lacks
    assert _meta(result, "champion_adapter")["promoted"] is True
    assert registry.read_pointer(registry.champion_pointer(isolated_lake))["run_id"] == training["run_id"]
    assert read_link(Path(training["path"]))["missing"] == training["mlflow_missing"]
