"""MLflow tracking, opt-in: each adapter's training, evaluation and promotion as one MLflow run, and the adapter as a
version of a registered model whose ``@champion`` alias follows promotion.

Off by default, and then MLflow is never imported (it is the optional ``[mlflow]`` extra): ``mlflow`` is imported
only inside ``Tracker``, which finpipe builds only when tracking is on. Turned on by the ``enabled`` setting
(``FINPIPE_MLFLOW=1``, ``finpipe run --mlflow``, or the ``tracking`` resource's config in the UI). The default store
is offline: a SQLite database with an artifact folder inside the lake (``<lake>/mlflow/``); any tracking URI works.

MLflow never fails the pipeline: every call goes through ``Tracker.attempt``, which records what was logged and what
was not; the first failure is said once (one warning line) and the step goes on without MLflow. Which MLflow run and
model version belong to an adapter is kept beside it (``mlflow_run.json`` in the adapter folder), so evaluation and
promotion, each in its own process, log into the run that training opened. Nothing here imports Dagster.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from finpipe.settings import non_finite, parse_bool, setting

#: the alias promotion moves onto the champion's model version
CHAMPION_ALIAS = "champion"
#: which MLflow run and model version an adapter has (in the adapter folder, written by the training step)
LINK_FILE = "mlflow_run.json"
#: where the MLflow web UI listens when started as docs/tracking.md says (the link of a run in a local store)
LOCAL_UI = "http://127.0.0.1:5000"
#: the web UI's address of a run
RUN_PAGE = "{ui}/#/experiments/{experiment_id}/runs/{run_id}"


@dataclass(frozen=True)
class TrackingSpec:
    """The tracking settings, declared once: the ``tracking`` resource of the Dagster definitions is derived from these
    fields, each has an environment variable (``ENVIRONMENT``), and ``finpipe run`` has ``--mlflow`` and
    ``--mlflow-tracking-uri``."""

    enabled: bool = setting(False, "log each adapter's training, evaluation and promotion to MLflow (the [mlflow] "
                            "extra); off: MLflow is not even imported")
    tracking_uri: str = setting("", "MLflow tracking URI; empty: the offline store in the lake, "
                                "sqlite:///<lake>/mlflow/mlflow.db with artifacts in <lake>/mlflow/artifacts "
                                "(a tracking server, http://host:port, works too)")
    experiment: str = setting("finpipe", "MLflow experiment the runs are logged to")
    registered_model: str = setting("finpipe-adapter", "registered model whose versions are the adapters; "
                                    "promotion moves its @champion alias")
    timeout_s: float = setting(10.0, "seconds a tracking server may take to answer before the step goes on "
                               "without it")

    def __post_init__(self) -> None:
        problems = non_finite(self)
        if self.timeout_s <= 0:
            problems.append(f"timeout_s must be > 0, got {self.timeout_s}")
        for name in ("experiment", "registered_model"):
            if not getattr(self, name).strip():
                problems.append(f"{name} must not be empty")
        if problems:
            raise ValueError("invalid tracking settings: " + "; ".join(problems))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "TrackingSpec":
        """The settings the environment gives (``ENVIRONMENT``); unset ones keep their defaults. The tracking URI is
        ``FINPIPE_MLFLOW_TRACKING_URI``, else MLflow's own ``MLFLOW_TRACKING_URI``, else the store in the lake."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, variable in ENVIRONMENT.items():
            text = environ.get(variable, "").strip()
            if name == "tracking_uri" and not text:
                text = environ.get("MLFLOW_TRACKING_URI", "").strip()
            if not text:
                continue
            kind = type(getattr(cls, name))
            try:
                values[name] = parse_bool(text) if kind is bool else kind(text)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise ValueError(f"{variable}: {exc}") from None
        return cls(**values)


#: each setting's environment variable
ENVIRONMENT = {"enabled": "FINPIPE_MLFLOW", "tracking_uri": "FINPIPE_MLFLOW_TRACKING_URI",
               "experiment": "FINPIPE_MLFLOW_EXPERIMENT", "registered_model": "FINPIPE_MLFLOW_MODEL",
               "timeout_s": "FINPIPE_MLFLOW_TIMEOUT_S"}


# --------------------------------------------------------------------------------------------- where runs are kept

def store_dir(lake_dir: Path) -> Path:
    return Path(lake_dir) / "mlflow"


def default_tracking_uri(lake_dir: Path) -> str:
    return f"sqlite:///{store_dir(lake_dir).resolve() / 'mlflow.db'}"


def artifact_root(lake_dir: Path) -> Path:
    return store_dir(lake_dir).resolve() / "artifacts"


def tracking_uri(spec: TrackingSpec, lake_dir: Path) -> str:
    return spec.tracking_uri or default_tracking_uri(lake_dir)


def is_server(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def shown_uri(uri: str) -> str:
    """The URI without a password (a server's URI may carry one): what logs, metadata and files may show."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.password is None:
        return uri
    host = parsed.hostname or ""
    netloc = f"{parsed.username}:***@{host}" + (f":{parsed.port}" if parsed.port else "")
    return urllib.parse.urlunparse(parsed._replace(netloc=netloc))


def ui_command(uri: str, lake_dir: Path) -> str:
    """How to see a local store's runs in MLflow's web UI (at ``LOCAL_UI``): ``finpipe ui --mlflow`` for the lake's
    own store, else the ``mlflow ui`` command line."""
    if uri == default_tracking_uri(lake_dir):
        return "finpipe ui --mlflow"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page: on the tracking server itself, or in the web UI of a local store (``ui_command``)."""
    ui = shown_uri(uri).rstrip("/") if is_server(uri) else LOCAL_UI
    return RUN_PAGE.format(ui=ui, experiment_id=experiment_id, run_id=run_id)


# --------------------------------------------------------------------------------------------- what a step logged

@dataclass
class Outcome:
    """What one step logged to MLflow and what it could not (``missing``, with the ``error`` that stopped it)."""

    tracking_uri: str
    run_id: str | None = None
    experiment_id: str | None = None
    model_version: str | None = None
    logged: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def url(self) -> str | None:
        return run_url(self.tracking_uri, self.experiment_id, self.run_id) if self.run_id and self.experiment_id else None

    def summary(self) -> dict[str, Any]:
        """Plain values for an asset's metadata: the run and its link, and what was not logged, if anything."""
        out: dict[str, Any] = {"mlflow_tracking_uri": shown_uri(self.tracking_uri)}
        if self.run_id:
            out |= {"mlflow_run_id": self.run_id, "mlflow_run": self.url}
        if self.model_version:
            out["mlflow_model_version"] = self.model_version
        if self.missing:
            out |= {"mlflow_missing": list(self.missing), "mlflow_error": self.error or ""}
        return out


def read_link(adapter_dir: Path) -> dict | None:
    """The adapter's MLflow run and model version (``LINK_FILE``), or None (trained with tracking off)."""
    try:
        return json.loads((Path(adapter_dir) / LINK_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_link(adapter_dir: Path, outcome: Outcome, registered_model: str) -> None:
    from finpipe.models.files import atomic_write_text

    atomic_write_text(Path(adapter_dir) / LINK_FILE, json.dumps({
        "tracking_uri": shown_uri(outcome.tracking_uri), "experiment_id": outcome.experiment_id,
        "run_id": outcome.run_id, "registered_model": registered_model, "model_version": outcome.model_version,
        "missing": outcome.missing, "error": outcome.error}, indent=2))


# --------------------------------------------------------------------------------------------- the MLflow session

def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


class Tracker:
    """One step's MLflow session. Every call goes through ``attempt``: a failure is recorded, said once (``warn``),
    and the rest of the step's logging is skipped and recorded as missing; nothing is ever raised."""

    def __init__(self, spec: TrackingSpec, lake_dir: Path, warn: Callable[[str], None] = print) -> None:
        self.spec, self.lake_dir, self.warn = spec, Path(lake_dir), warn
        self.uri = tracking_uri(spec, lake_dir)
        self.outcome = Outcome(self.uri)
        self._client = None

    def attempt(self, what: str, call: Callable[[Any], Any]) -> Any:
        """``call(client)``; its result, or None when MLflow failed now or earlier in this step."""
        if self.outcome.error is not None:
            self.outcome.missing.append(what)
            return None
        try:
            result = call(self.client())
        except Exception as exc:  # MLflow down, refused, misconfigured: never the pipeline's failure
            self.outcome.error = _first_line(exc)
            self.outcome.missing.append(what)
            self.warn(f"MLflow tracking at {shown_uri(self.uri)} failed ({self.outcome.error}) while logging {what}: "
                      "this step goes on without MLflow; what was not logged is in its metadata (mlflow_missing)")
            return None
        self.outcome.logged.append(what)
        return result

    def client(self):
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _connect(self):
        # before mlflow is imported: no telemetry; a server that does not answer costs seconds, not MLflow's default
        # of 7 retries with exponential backoff (minutes) for every call. A value the user set wins.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(self.spec.timeout_s))))
        if is_server(self.uri):
            self._probe()
        elif self.uri.startswith("sqlite:///") and self.uri.removeprefix("sqlite:///") not in ("", ":memory:"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)  # SQLite makes no folder
        import logging

        from mlflow import MlflowClient

        # a new SQLite store says "Updating database tables" at INFO in the middle of the training step's output
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def _probe(self) -> None:
        """One quick request to the server's /health: a server that is down is known in ``timeout_s``."""
        try:
            with urllib.request.urlopen(f"{self.uri.rstrip('/')}/health", timeout=self.spec.timeout_s) as answer:
                answer.read()
        except OSError as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ConnectionError(f"no answer from the tracking server ({reason})") from None

    def experiment_id(self, client) -> str:
        found = client.get_experiment_by_name(self.spec.experiment)
        if found is not None:
            return found.experiment_id
        # a server keeps artifacts where it is told to; a local store keeps them in the lake
        location = None if is_server(self.uri) else artifact_root(self.lake_dir).as_uri()
        try:
            return client.create_experiment(self.spec.experiment, artifact_location=location)
        except Exception:  # another process created it meanwhile
            found = client.get_experiment_by_name(self.spec.experiment)
            if found is None:
                raise
            return found.experiment_id


def _tracker_for_adapter(tracker: Tracker, adapter_dir: Path, what: str) -> dict | None:
    """The adapter's link when it has an MLflow run; else None, with ``what`` recorded as missing (said by the
    training step already, or tracking was off then)."""
    link = read_link(adapter_dir)
    if link and link.get("run_id"):
        tracker.outcome.run_id, tracker.outcome.experiment_id = link["run_id"], link.get("experiment_id")
        tracker.outcome.model_version = link.get("model_version")
        return link
    tracker.outcome.missing.append(what)
    tracker.outcome.error = ("the adapter has no MLflow run (tracking failed or was off when it was trained)"
                             if link is None or not link.get("error") else f"no MLflow run since training: {link['error']}")
    return None


# --------------------------------------------------------------------------------------------- the steps' logging

def code_version(repo: Path | None = None) -> str:
    """finpipe's version and, in a git checkout, its commit (``+dirty`` with uncommitted changes)."""
    from finpipe import __version__
    from finpipe.paths import REPO_ROOT

    repo = repo or REPO_ROOT
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{commit}" + (".dirty" if dirty else "")


def _git_commit(version: str) -> str | None:
    return version.split("+g", 1)[1].removesuffix(".dirty") if "+g" in version else None


@dataclass(frozen=True)
class TrainingRecord:
    """What the training step hands to MLflow: the adapter, its spec and report, the data it was trained on and
    where it ran."""

    adapter_run_id: str          # finpipe's run id (the adapter folder's name)
    adapter_dir: Path
    params: dict[str, Any]       # the AdapterSpec's fields (and warm_start)
    report: dict[str, Any]       # TrainReport as a dict
    base_model: str
    dataset_name: str
    dataset_path: Path           # the training split
    dataset_digest: str          # its SHA-256 prefix, as split.json records it
    dataset_rows: int
    dagster_run_id: str
    lake_snapshot: str           # the newest lake snapshot when training started ("none" before the first)
    code_version: str


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _metrics(pairs, key: str):
    from mlflow.entities import Metric

    return [Metric(key, float(value), _now_ms(), int(step)) for step, value in pairs if value is not None]


def _log_in_chunks(client, run_id: str, metrics=(), params=(), tags=()) -> None:
    """``log_batch`` within MLflow's limits (1000 metrics, 100 params, 100 tags per call)."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    while metrics or params or tags:
        client.log_batch(run_id, metrics=metrics[:1000], params=params[:100], tags=tags[:100])
        metrics, params, tags = metrics[1000:], params[100:], tags[100:]


def log_training(spec: TrackingSpec, lake_dir: Path, record: TrainingRecord, warn: Callable[[str], None] = print
                 ) -> Outcome:
    """Open the adapter's MLflow run: tags, the spec as parameters, the per-step losses and the learning curve as
    metrics with steps, the training split as a dataset input, the adapter folder as artifacts, a new version of the
    registered model; then close the run (evaluation and promotion log into it later) and write ``LINK_FILE``."""
    tracker = Tracker(spec, lake_dir, warn)
    report = record.report

    def open_run(client):
        from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

        experiment_id = tracker.experiment_id(client)
        tags = {"dagster.run_id": record.dagster_run_id, "finpipe.run_id": record.adapter_run_id,
                "finpipe.code_version": record.code_version, "finpipe.lake_snapshot": record.lake_snapshot,
                "finpipe.base_model": record.base_model, "finpipe.dataset_digest": record.dataset_digest}
        if commit := _git_commit(record.code_version):
            tags[MLFLOW_GIT_COMMIT] = commit
        run = client.create_run(experiment_id, tags=tags, run_name=record.adapter_run_id)
        tracker.outcome.run_id, tracker.outcome.experiment_id = run.info.run_id, experiment_id
        return run

    run = tracker.attempt("run", open_run)
    run_id = run.info.run_id if run else ""

    def params(client):
        from mlflow.entities import Param

        _log_in_chunks(client, run_id, params=[Param(k, str(v)) for k, v in sorted(record.params.items())])

    def metrics(client):
        from mlflow.entities import Metric

        found = _metrics(report.get("train_losses") or [], "train_loss")
        found += _metrics(report.get("eval_losses") or [], "val_loss")
        for point in report.get("curve") or []:  # the learning curve, at the steps of its evaluations
            for key, value in point.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    found.append(Metric(f"curve/{key}", float(value), _now_ms(), int(point["step"])))
        for key in ("initial_eval_loss", "best_eval_loss", "train_tokens", "cumulative_train_tokens", "tokens_per_s",
                    "seconds", "steps", "trainable_params", "peak_memory_mb"):
            if isinstance(report.get(key), (int, float)):
                found.append(Metric(key, float(report[key]), _now_ms(), int(report.get("steps") or 0)))
        _log_in_chunks(client, run_id, metrics=found)

    def dataset(client):
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        source = json.dumps({"uri": Path(record.dataset_path).resolve().as_uri()})
        data = Dataset(name=record.dataset_name, digest=record.dataset_digest, source_type="local", source=source,
                       profile=json.dumps({"num_rows": record.dataset_rows}))
        client.log_inputs(run_id, datasets=[DatasetInput(data, [InputTag(MLFLOW_DATASET_CONTEXT, "train")])])

    def artifacts(client):
        client.log_artifacts(run_id, str(record.adapter_dir), "adapter")

    def version(client):
        from mlflow.exceptions import MlflowException

        try:
            client.get_registered_model(spec.registered_model)
        except MlflowException:
            try:
                client.create_registered_model(spec.registered_model, description="finpipe's LoRA adapters; "
                                               f"@{CHAMPION_ALIAS} is the one promotion chose")
            except MlflowException:  # another process registered it meanwhile
                client.get_registered_model(spec.registered_model)
        created = client.create_model_version(
            spec.registered_model, f"runs:/{run_id}/adapter", run_id=run_id,
            tags={"finpipe.run_id": record.adapter_run_id, "finpipe.base_model": record.base_model,
                  "finpipe.status": "trained"},
            description=f"PEFT adapter {record.adapter_run_id} on {record.base_model}", await_creation_for=0)
        tracker.outcome.model_version = str(created.version)

    if run:
        tracker.attempt("parameters", params)
        tracker.attempt("metrics", metrics)
        tracker.attempt("dataset", dataset)
        tracker.attempt("artifacts", artifacts)
        tracker.attempt("model version", version)
        tracker.attempt("run end", lambda client: client.set_terminated(run_id, "FINISHED"))
    else:
        tracker.outcome.missing += ["parameters", "metrics", "dataset", "artifacts", "model version"]
    write_link(record.adapter_dir, tracker.outcome, spec.registered_model)
    return tracker.outcome


def evaluation_metrics(evaluation: dict) -> dict[str, float]:
    """The numbers of ``evaluation.json`` as MLflow metric keys: each variant's losses, strict and format metrics
    with their 95% intervals (``..._ci_low``, ``..._ci_high``), the forgetting probe, the end-to-end means, and the
    paired differences with their intervals."""
    from finpipe.evaluation.evaluate import HEADLINE_METRICS

    out: dict[str, float] = {}

    def put(key: str, value) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)

    for name, scores in (evaluation.get("variants") or {}).items():
        if not scores:
            continue
        put(f"{name}/val_loss", (scores.get("val") or {}).get("loss"))
        golden = scores.get("golden") or {}
        put(f"{name}/golden_loss", golden.get("loss"))
        for metric in HEADLINE_METRICS:
            put(f"{name}/golden/{metric}", (golden.get("overall") or {}).get(metric))
            interval = (golden.get("ci") or {}).get(metric)
            if interval:
                put(f"{name}/golden/{metric}_ci_low", interval[0])
                put(f"{name}/golden/{metric}_ci_high", interval[1])
        put(f"{name}/forgetting_probe", (scores.get("forgetting") or {}).get("score"))
        parts = ((scores.get("end_to_end") or {}).get("summary") or {}).get("parts") or {}
        for part, got in parts.items():
            for metric, value in (got.get("means") or {}).items():
                put(f"{name}/end_to_end/{part}/{metric}", value)
    for pair, metrics in (evaluation.get("differences") or {}).items():
        for metric, found in (metrics or {}).items():
            if found:
                key = f"difference/{pair.replace(' - ', '_minus_')}/{metric}"
                put(key, found[0])
                put(f"{key}_ci_low", found[1])
                put(f"{key}_ci_high", found[2])
    return out


def log_evaluation(spec: TrackingSpec, lake_dir: Path, adapter_dir: Path, evaluation: dict, evaluation_file: Path,
                   warn: Callable[[str], None] = print) -> Outcome:
    """The strict metrics with their intervals (``evaluation_metrics``) and ``evaluation.json`` into the adapter's
    run."""
    tracker = Tracker(spec, lake_dir, warn)
    if not _tracker_for_adapter(tracker, adapter_dir, "evaluation"):
        return tracker.outcome
    run_id = tracker.outcome.run_id

    def metrics(client):
        from mlflow.entities import Metric, RunTag

        found = [Metric(k, v, _now_ms(), 0) for k, v in sorted(evaluation_metrics(evaluation).items())]
        _log_in_chunks(client, run_id, metrics=found,
                       tags=[RunTag("finpipe.golden_hash", str(evaluation.get("golden_hash")))])

    tracker.attempt("evaluation metrics", metrics)
    tracker.attempt("evaluation.json", lambda client: client.log_artifact(run_id, str(evaluation_file), "evaluation"))
    return tracker.outcome


def log_report(spec: TrackingSpec, lake_dir: Path, adapter_dir: Path, files: list[Path],
               warn: Callable[[str], None] = print) -> Outcome:
    """The evaluation report's files (HTML, Markdown, images) into the adapter's run, under ``report/``."""
    tracker = Tracker(spec, lake_dir, warn)
    if not _tracker_for_adapter(tracker, adapter_dir, "report"):
        return tracker.outcome
    run_id = tracker.outcome.run_id

    def report(client):
        for path in files:
            client.log_artifact(run_id, str(path), "report")

    tracker.attempt("report", report)
    return tracker.outcome


def log_promotion(spec: TrackingSpec, lake_dir: Path, adapter_dir: Path, promoted: bool, reason: str,
                  model_card: Path | None, warn: Callable[[str], None] = print) -> Outcome:
    """Promotion's decision: a promoted adapter's version gets the ``@champion`` alias (moved from the previous
    champion's); a refused one's version is tagged rejected and the alias stays where it is. The model card is logged
    into the run."""
    tracker = Tracker(spec, lake_dir, warn)
    link = _tracker_for_adapter(tracker, adapter_dir, "promotion")
    if not link:
        return tracker.outcome
    run_id, version = tracker.outcome.run_id, link.get("model_version")
    model = link.get("registered_model") or spec.registered_model
    status = "champion" if promoted else "rejected"

    def decision(client):
        from mlflow.entities import RunTag

        _log_in_chunks(client, run_id, tags=[RunTag("finpipe.promotion", status),
                                             RunTag("finpipe.promotion_reason", reason[:5000])])

    def alias(client):
        if version is None:
            raise LookupError("the adapter has no model version (its registration failed at training)")
        client.set_model_version_tag(model, version, "finpipe.status", status)
        if promoted:
            client.set_registered_model_alias(model, CHAMPION_ALIAS, version)

    tracker.attempt("promotion decision", decision)
    tracker.attempt(f"@{CHAMPION_ALIAS} alias" if promoted else "model version status", alias)
    if model_card is not None:
        tracker.attempt("model card", lambda client: client.log_artifact(run_id, str(model_card)))
    return tracker.outcome


def spec_params(spec: Any, **extra: Any) -> dict[str, Any]:
    """A spec dataclass's fields (plus ``extra``) as MLflow parameters."""
    return dataclasses.asdict(spec) | extra
