"""Scale-out (the multiprocess executor for real, lake-writer limits, the deploy/ examples) and security basics
(safetensors only, no remote code, loopback-only servers, secrets only from the environment)."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import pickle
import re
import sys
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from finpipe.defs.datasets import dataset_split, instruction_samples
from finpipe.defs.market_data import daily_prices
from finpipe.defs.models import base_model
from finpipe.defs.partitions import PARTITION_RANGE_END_TAG, PARTITION_RANGE_START_TAG
from finpipe.defs.resources import (
    LAKE_WRITER_LIMITS,
    LAKE_WRITER_POOL,
    LAKE_WRITER_TAGS,
    HuggingFaceResource,
    LakeResource,
    MarketDataResource,
    TrackingResource,
)
from finpipe.defs.statistics import price_statistics
from finpipe.market.lake import PriceLake

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy"

# ------------------------------------------------------------------------------------------------ scale-out

#: what the multiprocess test runs: the data lineage (three lake steps in a chain), base_model (no lake writes, no
#: upstream: it runs beside them) and a second lake writer without upstream (lake_probe, below) that only the
#: writer limit keeps from running beside daily_prices
PRICE_RANGE = ("2012-10-01", "2012-12-31")  # few partitions: one planned event each
#: families whose statistics three months of prices already give (the family-balance gate sees them all present)
FAST_SAMPLES = {"ops": {"instruction_samples": {"config": {"date_stride": 10, "families": ["price", "momentum"]}}}}
LAKE_WRITER_STEPS = {"daily_prices", "price_statistics", "lake_probe"}


@dg.asset(pool=LAKE_WRITER_POOL, op_tags=LAKE_WRITER_TAGS, group_name="scale_out_test")
def lake_probe(lake: LakeResource) -> None:
    """A lake writer with no upstream."""
    lake.prices_lake().replace_table("scale_out_probe", pl.DataFrame({"pid": [os.getpid()]}))


SCALE_OUT_ASSETS = [daily_prices, price_statistics, instruction_samples, dataset_split, base_model, lake_probe]


def _scale_out_resources(lake_dir: str = "") -> dict:
    return {"lake": LakeResource(lake_dir=lake_dir), "market_data": MarketDataResource(),
            "huggingface": HuggingFaceResource(), "tracking": TrackingResource()}  # MLflow tracking off


def scale_out_checks() -> list:
    """finpipe's checks of the scale-out assets: the split refuses samples whose gates did not run."""
    from finpipe.definitions import defs as finpipe_defs

    keys = {key for a in SCALE_OUT_ASSETS for key in a.keys}
    return [c for c in finpipe_defs.asset_checks if {k.asset_key for k in c.check_keys} <= keys]


def scale_out_job() -> dg.JobDefinition:
    """Module-level, so the multiprocess executor's step processes can rebuild it (dg.reconstructable)."""
    from finpipe.definitions import multiprocess_lake_safe

    defs = dg.Definitions(
        assets=SCALE_OUT_ASSETS, asset_checks=scale_out_checks(), resources=_scale_out_resources(),
        jobs=[dg.define_asset_job("scale_out", selection=dg.AssetSelection.assets(*SCALE_OUT_ASSETS),
                                  executor_def=multiprocess_lake_safe)])
    return defs.resolve_job_def("scale_out")


def _tiny_model_folder(folder: Path, num_layers: int = 1) -> Path:
    from finpipe.models.scratch import train_tokenizer
    from finpipe_tests.helpers import make_tiny_llama

    texts = ["AAPL closed at 430.47 on 2013-03-01.", "MSFT rose 1.2% over 5 sessions.", "What is the trend?"] * 20
    return make_tiny_llama(folder, train_tokenizer(texts, vocab_size=300), num_layers=num_layers)


def _run_config(lake_dir: Path, base_dir: Path) -> dict:
    return {"ops": {**FAST_SAMPLES["ops"], "base_model": {"config": {"model": str(base_dir)}}},
            "resources": {"lake": {"config": {"lake_dir": str(lake_dir)}}}}


def _lake_contents(lake_dir: Path) -> dict:
    lake = PriceLake(lake_dir / "finpipe.duckdb")
    tables = {t: lake.query(f"SELECT * EXCLUDE (ingested_at) FROM {t} ORDER BY ALL") if t == "prices"
              else lake.query(f"SELECT * FROM {t} ORDER BY ALL") for t in ("prices", "price_statistics", "instruments")}
    files = {p: (lake_dir / "datasets" / p).read_bytes() for p in ("samples.jsonl", "split/train.jsonl",
                                                                    "split/val.jsonl", "split/split.json")}
    return {"tables": tables, "files": files}


def _worker_starting(event) -> bool:
    return event.event_type == dg.DagsterEventType.STEP_WORKER_STARTING


def _in_flight(records, launched_by=_worker_starting) -> dict[str, tuple[int, int]]:
    """step key -> (position of its launch, position of its success) in the run's event log; a step is launched by
    the first event ``launched_by`` accepts (the multiprocess executor's: its process is starting)."""
    launched, done = {}, {}
    for i, record in enumerate(records):
        event = record.dagster_event
        if event is not None and event.step_key not in launched and launched_by(event):
            launched[event.step_key] = i
        elif event is not None and event.event_type == dg.DagsterEventType.STEP_SUCCESS:
            done[event.step_key] = i
    return {key: (launched[key], done[key]) for key in launched}


def test_the_multiprocess_executor_runs_steps_in_parallel_processes_but_never_two_lake_writers(tmp_path):
    base_dir = _tiny_model_folder(tmp_path / "tiny_base")
    tags = {PARTITION_RANGE_START_TAG: PRICE_RANGE[0], PARTITION_RANGE_END_TAG: PRICE_RANGE[1]}
    # a persistent (sqlite) instance as `dagster dev` has one (the multiprocess executor needs it), without any
    # pool limit configured: the executor's own tag limit is what keeps the lake writers apart
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home"),
                              overrides={"telemetry": {"enabled": False}}) as instance:
        # three at once: base_model, daily_prices and lake_probe are all ready at the start
        run_config = _run_config(tmp_path / "parallel", base_dir) | {"execution": {"config": {"max_concurrent": 3}}}
        result = dg.execute_job(dg.reconstructable(scale_out_job), instance=instance, tags=tags, run_config=run_config)
        records = instance.all_logs(result.run_id)
        assert result.success, [r.dagster_event.event_specific_data.error.to_string() for r in records
                                if r.dagster_event and r.dagster_event.event_type == dg.DagsterEventType.STEP_FAILURE]

    events = [r.dagster_event for r in records if r.dagster_event]
    starts = {e.step_key: e.pid for e in events if e.event_type == dg.DagsterEventType.STEP_START}
    assert {a.key.to_user_string() for a in SCALE_OUT_ASSETS} <= set(starts)  # and the checks' steps
    # every step in a process of its own, none in the run's (parent) process
    parent = {e.pid for e in events if e.event_type == dg.DagsterEventType.RUN_START}
    assert len(set(starts.values())) == len(starts) and not parent & set(starts.values())

    spans = _in_flight(records)
    overlap = lambda a, b: spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]  # noqa: E731
    # parallel: the base model ran while the prices were being ingested
    assert overlap("base_model", "daily_prices")
    # ...but lake writers one at a time, also the two that do not depend on each other
    writers = sorted(LAKE_WRITER_STEPS)
    assert not any(overlap(a, b) for i, a in enumerate(writers) for b in writers[i + 1:]), spans

    # the same assets in-process give the same lake
    in_process = dg.materialize([*SCALE_OUT_ASSETS, *scale_out_checks()],
                                resources=_scale_out_resources(str(tmp_path / "serial")), tags=tags,
                                run_config={"ops": _run_config(tmp_path / "serial", base_dir)["ops"]})
    assert in_process.success
    parallel, serial = _lake_contents(tmp_path / "parallel"), _lake_contents(tmp_path / "serial")
    assert parallel["files"] == serial["files"]
    for table, frame in parallel["tables"].items():
        assert frame.height > 0 and frame.equals(serial["tables"][table]), table


def test_lake_writers_are_limited_in_every_launched_run():
    from finpipe.definitions import defs

    writers = {"daily_prices", "price_statistics", "adapter_evaluation", "champion_adapter", "peft_method_run",
               "compression_study"}
    pooled = {a.key.to_user_string(): (a.op.pool, a.op.tags) for a in defs.assets if a.op.pool}
    assert set(pooled) == writers
    assert all(pool == LAKE_WRITER_POOL and tags.items() >= LAKE_WRITER_TAGS.items() for pool, tags in pooled.values())
    # the code location's executor (UI, schedule and sensor runs) caps the writers' tag at one step at a time
    job = defs.resolve_job_def("nightly_retrain")
    assert job.executor_def.name == "multiprocess_lake_safe"
    for run_config in ({}, {"execution": {"config": {"max_concurrent": 1}}}):  # max_concurrent stays settable
        executor = dg.validate_run_config(job, run_config)["execution"]["multiprocess_lake_safe"]
        assert executor["tag_concurrency_limits"] == LAKE_WRITER_LIMITS
    assert executor["max_concurrent"] == 1


# ------------------------------------------------------------------------------------------------ deploy/ examples

def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"deploy_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _instance_config(path: Path, tmp_path: Path) -> dict:
    """The instance YAML validated against Dagster's own dagster.yaml schema."""
    from dagster._core.instance.config import dagster_instance_config

    home = tmp_path / path.stem
    home.mkdir()
    (home / "dagster.yaml").write_text(path.read_text())
    config, _ = dagster_instance_config(str(home))
    return config


def _validated(schema, value) -> dict:
    from dagster._config import process_config, resolve_to_config_type

    result = process_config(resolve_to_config_type(schema), value)
    assert result.success, result.errors
    return result.value


def test_every_deploy_file_parses_and_says_what_it_is(tmp_path):
    files = sorted(DEPLOY.iterdir())
    assert {f.name for f in files} >= {"dagster-k8s.yaml", "k8s_job_config.py", "dagster-celery.yaml",
                                      "dagster-celery-instance.yaml", "celery_code_location.py",
                                      "accelerate_multi_gpu.sh"}
    for f in files:
        text = f.read_text()
        header = text.split("\n", 1)[1] if text.startswith("#!") else text
        assert header.startswith(("#", '"""')), f"{f.name} has no header comment"
        assert not re.search(r"hf_[A-Za-z0-9]{16,}", text), f"{f.name} holds something like a token"
        if f.suffix == ".yaml":
            assert isinstance(yaml.safe_load(text), dict)

    k8s = _instance_config(DEPLOY / "dagster-k8s.yaml", tmp_path)
    assert k8s["telemetry"] == {"enabled": False}
    launcher = k8s["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    assert "REPLACE" in launcher["config"]["job_image"]  # a placeholder, not somebody's image
    assert launcher["config"]["env_secrets"] == ["finpipe-secrets"]  # HF_TOKEN from a Kubernetes Secret
    assert not any(v.startswith("HF_TOKEN") for v in launcher["config"]["env_vars"])
    assert k8s["storage"]["postgres"]["postgres_db"]["password"] == {"env": "DAGSTER_PG_PASSWORD"}
    assert k8s["concurrency"]["pools"] == {"default_limit": 1, "granularity": "op"}

    celery_instance = _instance_config(DEPLOY / "dagster-celery-instance.yaml", tmp_path)
    assert celery_instance["telemetry"] == {"enabled": False}
    assert celery_instance["storage"]["postgres"]["postgres_db"]["password"] == {"env": "DAGSTER_PG_PASSWORD"}
    # the Celery executor honours op pools, not tag limits: finpipe_lake one step at a time across workers and runs
    # (test_distributed_executor.py), and a terminated run's writer slot freed by the daemon
    assert celery_instance["concurrency"]["pools"] == {"default_limit": 1, "granularity": "op"}
    assert celery_instance["run_monitoring"]["free_slots_after_run_end_seconds"] > 0
    celery = yaml.safe_load((DEPLOY / "dagster-celery.yaml").read_text())["execution"]["config"]
    assert celery["broker"] == {"env": "DAGSTER_CELERY_BROKER_URL"}  # a URL with a password stays out of files


def test_the_multi_gpu_script_runs_finpipe_training_with_its_real_options():
    import subprocess

    script = DEPLOY / "accelerate_multi_gpu.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    # a thin wrapper over the launcher the qlora_adapter asset uses (finpipe.training.launch)
    assert "exec python -m finpipe.training" in text and '--processes "$NUM_GPUS"' in text
    options = {line.split()[0] for line in text.splitlines() if line.strip().startswith("--")}
    usage = subprocess.run([sys.executable, "-m", "finpipe.training", "--help"], cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=120).stdout
    known = set(re.findall(r"(--[a-z][a-z0-9-]*)", usage))
    assert {"--processes", "--base", "--train", "--val", "--out", "--job-dir"} <= options <= known


def test_the_k8s_code_location_puts_only_the_training_step_on_a_gpu(tmp_path):
    pytest.importorskip("dagster_k8s", reason="dagster-k8s is not installed (pip install dagster-k8s==<dagster's "
                                              "0.x twin>); the YAML itself is checked without it")
    import kubernetes
    from dagster_k8s import K8sRunLauncher
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import (
        DagsterK8sJobConfig,
        UserDefinedDagsterK8sConfig,
        construct_dagster_k8s_job,
        get_user_defined_k8s_config,
    )

    module = _load_module(DEPLOY / "k8s_job_config.py")
    job = module.defs.resolve_job_def("nightly_retrain")
    executor = dg.validate_run_config(job, {})["execution"]["finpipe_k8s_job_executor"]
    assert executor["tag_concurrency_limits"] == LAKE_WRITER_LIMITS  # still one lake writer at a time
    assert set(executor["per_step_k8s_config"]) == {"qlora_adapter"}
    launcher = _validated(K8sRunLauncher.config_type(),
                          yaml.safe_load((DEPLOY / "dagster-k8s.yaml").read_text())["run_launcher"]["config"])
    # the same dict is valid as the op tag dagster-k8s/config
    tag = get_user_defined_k8s_config({"dagster-k8s/config": json.dumps(module.QLORA_ADAPTER_K8S_CONFIG)})
    assert tag.pod_spec_config["node_selector"] == {"nvidia.com/gpu.present": "true"}

    def step_job(step: str) -> dict:
        # the merge order of dagster_k8s' K8sStepHandler._get_container_context: launcher, executor, step override
        context = K8sContainerContext(
            image_pull_policy=launcher["image_pull_policy"], service_account_name=launcher["service_account_name"],
            env_secrets=launcher["env_secrets"], env_vars=launcher["env_vars"],
            volume_mounts=launcher["volume_mounts"], volumes=launcher["volumes"],
            security_context=launcher["security_context"], namespace=launcher["job_namespace"],
            run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(launcher["run_k8s_config"]),
        ).merge(K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(executor["step_k8s_config"])))
        context = context.merge(K8sContainerContext(
            run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(executor["per_step_k8s_config"].get(step, {}))))
        config = DagsterK8sJobConfig(job_image=launcher["job_image"], dagster_home=launcher["dagster_home"],
                                     instance_config_map=launcher["instance_config_map"],
                                     postgres_password_secret=launcher["postgres_password_secret"])
        k8s_job = construct_dagster_k8s_job(config, ["dagster", "api", "execute_step"], f"dagster-step-{step}",
                                            user_defined_k8s_config=context.run_k8s_config)
        return kubernetes.client.ApiClient().sanitize_for_serialization(k8s_job)

    training, ingest = step_job("qlora_adapter"), step_job("daily_prices")
    pod = training["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"secretRef": {"name": "finpipe-secrets"}} in container["envFrom"]
    assert {"mountPath": "/lake", "name": "lake"} in container["volumeMounts"]
    for spec in (pod, ingest["spec"]["template"]["spec"]):  # every step: the one shared (ReadWriteMany) lake volume
        assert {"name": "lake", "persistentVolumeClaim": {"claimName": "finpipe-lake"}} in spec["volumes"]
        # secrets only by reference: no value of HF_TOKEN or the proxy in the pod spec
        env = spec["containers"][0].get("env") or []
        assert not any(e["name"] in ("HF_TOKEN", "FINPIPE_YAHOO_PROXY") and "value" in e for e in env)
    assert container["securityContext"]["runAsNonRoot"] is True
    cpu_pod = ingest["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(cpu_pod) and "nodeSelector" not in cpu_pod
    assert cpu_pod["containers"][0]["resources"]["requests"] == {"cpu": "1", "memory": "2Gi"}


def test_the_celery_code_location_and_workers_share_one_config(monkeypatch):
    pytest.importorskip("dagster_celery", reason="dagster-celery is not installed (pip install dagster-celery=="
                                                 "<dagster's 0.x twin>); the YAML itself is checked without it")
    from dagster_celery.cli import get_validated_config

    monkeypatch.setenv("DAGSTER_CELERY_BROKER_URL", "pyamqp://finpipe:secret@rabbitmq:5672//")
    module = _load_module(DEPLOY / "celery_code_location.py")
    job = module.defs.resolve_job_def("nightly_retrain")
    executor = dg.validate_run_config(job, {})["execution"]["finpipe_celery_executor"]
    assert executor["broker"] == "pyamqp://finpipe:secret@rabbitmq:5672//"  # resolved from the environment
    assert executor["config_source"]["worker_prefetch_multiplier"] == 1
    # a step whose worker process dies goes back to the queue (without it dagster-celery's run waits forever)
    assert executor["config_source"]["task_acks_late"] is executor["config_source"]["task_reject_on_worker_lost"] is True
    worker = get_validated_config(str(DEPLOY / "dagster-celery.yaml"))  # what `dagster-celery worker start -y` reads
    assert worker["broker"] == executor["broker"]


# ------------------------------------------------------------------------------------------------ security

class _Canary:
    """Unpickling this touches ``path``: proof that a pickle was (or was not) loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _pickle_only_model(folder: Path, config_from: Path, marker: Path, name: str = "pytorch_model.bin") -> Path:
    folder.mkdir(parents=True)
    for f in config_from.iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    (folder / name).write_bytes(pickle.dumps(_Canary(marker)))
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return _tiny_model_folder(tmp_path_factory.mktemp("tiny_model"))


def test_pickle_checkpoints_are_refused_before_anything_is_unpickled(tmp_path, tiny_model):
    from finpipe.evaluation.generation import load_chat_model
    from finpipe.inference.export import export_merged
    from finpipe.models.safe_loading import MODEL_LOAD_KWARGS, UnsafeCheckpointError, load_causal_lm
    from finpipe.studies.compression import load_variant
    from finpipe.training.device import plan_device
    from finpipe.training.sft import load_base

    marker = tmp_path / "unpickled"
    pickled = _pickle_only_model(tmp_path / "pickled", tiny_model, marker)
    for load in (lambda: load_causal_lm(pickled), lambda: load_chat_model(pickled),
                 lambda: load_base(pickled, "none", plan_device(prefer_cpu=True)), lambda: load_variant(pickled, "fp32")):
        with pytest.raises(UnsafeCheckpointError, match=r"only has pickle weights \(pytorch_model.bin\).*safetensors"):
            load()
    # transformers itself, with the kwargs finpipe passes, refuses too (defence in depth)
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(str(pickled), **MODEL_LOAD_KWARGS)
    # a config that names pickle weights explicitly (transformers would load them before model.safetensors)
    named = tmp_path / "named"
    named.mkdir()
    for f in tiny_model.iterdir():
        (named / f.name).write_bytes(f.read_bytes())
    config = json.loads((named / "config.json").read_text()) | {"transformers_weights": "weights.bin"}
    (named / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsafeCheckpointError, match="transformers_weights"):
        load_causal_lm(named)

    # a PEFT adapter saved as adapter_model.bin: PeftModel.from_pretrained would torch.load it
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"],
                                                             "base_model_name_or_path": str(tiny_model)}))
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Canary(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"adapter_model.bin"):
        load_chat_model(tiny_model, adapter)
    with pytest.raises(UnsafeCheckpointError):
        export_merged(tiny_model, adapter, tmp_path / "merged")
    assert not marker.exists()


def _with_remote_code(folder: Path, marker: Path, model_type: str | None = None) -> Path:
    code = f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
    for module in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (folder / f"{module}.py").write_text(code + "raise SystemExit('remote code ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    if model_type:
        config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    return folder


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_code_shipped_with_a_model_never_runs(tmp_path, tiny_model, lake_resources):
    from finpipe.evaluation.generation import load_chat_model
    from finpipe.models.safe_loading import UnsafeCheckpointError, load_causal_lm, load_tokenizer

    marker = tmp_path / "remote_code_ran"
    known = _with_remote_code(_copy(tiny_model, tmp_path / "known"), marker)
    model, tokenizer = load_chat_model(known)  # auto_map ignored: the built-in Llama classes load it
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer("AAPL")["input_ids"]
    # the base_model asset on such a folder (AutoConfig + the tokenizer, both without remote code)
    result = dg.materialize([base_model], resources=lake_resources() | {"huggingface": HuggingFaceResource()},
                            run_config={"ops": {"base_model": {"config": {"model": str(known)}}}})
    assert result.success
    unknown = _with_remote_code(_copy(tiny_model, tmp_path / "unknown"), marker, model_type="finpipe_evil")
    with pytest.raises(ValueError):  # no built-in class: refused instead of running the folder's code
        load_causal_lm(unknown)
    with pytest.raises(UnsafeCheckpointError, match="trust_remote_code"):
        load_causal_lm(known, trust_remote_code=True)
    with pytest.raises(UnsafeCheckpointError, match="trust_remote_code"):
        load_tokenizer(known, trust_remote_code=True)
    assert not marker.exists()


def test_the_hub_download_fetches_neither_pickles_nor_code(tmp_path, tiny_model, lake_resources, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from finpipe.defs.models import HUB_ALLOW_PATTERNS

    repo = ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "model.safetensors",
            "model-00001-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.model", "merges.txt",
            "pytorch_model.bin", "model.pt", "training_args.bin", "optimizer.pth", "model.ckpt", "model.pkl",
            "modeling_custom.py", "configuration_custom.py", "flax_model.msgpack", "tf_model.h5"]
    fetched = set(filter_repo_objects(repo, allow_patterns=HUB_ALLOW_PATTERNS))
    assert not {f for f in fetched if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl", ".py", ".msgpack", ".h5"))}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= fetched

    # a hub repository that only has pickle weights: the download brings no weights, base_model fails clearly
    marker = tmp_path / "unpickled"
    remote = _pickle_only_model(tmp_path / "remote", tiny_model, marker)
    calls = []

    def fake_snapshot_download(repo_id, revision, local_dir, token, allow_patterns):
        calls.append(token)
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        for name in filter_repo_objects([f.name for f in remote.iterdir()], allow_patterns=allow_patterns):
            (Path(local_dir) / name).write_bytes((remote / name).read_bytes())

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_TOKEN", "hf_canary_token_for_the_test")
    resources = lake_resources() | {"huggingface": HuggingFaceResource(token=dg.EnvVar("HF_TOKEN"))}
    result = dg.materialize([base_model], resources=resources, raise_on_error=False,
                            run_config={"ops": {"base_model": {"config": {"model": "someone/pickled-model"}}}})
    assert not result.success
    failure = result.failure_data_for_node("base_model").error.message
    assert "no weights at all" in failure and "safetensors" in failure
    assert calls == ["hf_canary_token_for_the_test"]  # the token reaches the hub client at run time...
    assert not any("hf_canary" in str(e) for e in result.all_events)  # ...and no event or log line
    assert not marker.exists()


def test_servers_listen_on_loopback_only(monkeypatch, tmp_path, isolated_lake):
    from dagster_webserver.cli import DEFAULT_WEBSERVER_HOST

    from finpipe import cli

    monkeypatch.setenv("DAGSTER_HOME", str(isolated_lake / "dagster_home"))  # `finpipe ui` sets it: undone after
    assert cli.build_parser().parse_args(["ui"]).host == "127.0.0.1"
    launched = []
    monkeypatch.setattr(cli.os, "execv", lambda file, argv: launched.append(argv))
    monkeypatch.setattr(cli.os, "chdir", lambda path: None)
    cli.main(["ui"])
    argv = launched[0]
    # the venv's own dg, so `.venv/bin/finpipe ui` works without an activated venv
    assert argv[0] == str(Path(sys.executable).parent / "dg") and argv[1] == "dev"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    home = Path(os.environ["DAGSTER_HOME"])
    assert yaml.safe_load((home / "dagster.yaml").read_text())["telemetry"] == {"enabled": False}
    # plain `dagster dev` binds loopback too, and the workspace starts no server of its own on another address
    assert DEFAULT_WEBSERVER_HOST == "127.0.0.1"
    workspace = yaml.safe_load((REPO_ROOT / "workspace.yaml").read_text())
    assert [list(entry) for entry in workspace["load_from"]] == [["python_module"]]
    assert "host" not in json.dumps(workspace)


def test_secrets_come_only_from_the_environment(monkeypatch):
    from dagster._core.remote_representation.external_data import RepositorySnap
    from dagster_shared.serdes import serialize_value

    from finpipe.definitions import in_groups
    from finpipe.defs.resources import build_resources

    monkeypatch.setenv("HF_TOKEN", "hf_canary_token_for_the_test")
    monkeypatch.setenv("FINPIPE_YAHOO_PROXY", "http://user:canary_password@proxy.corp:3128")
    monkeypatch.setenv("FINPIPE_MLFLOW_TRACKING_URI", "https://user:canary_mlflow@mlflow.corp")
    resources = build_resources()
    defs = dg.Definitions(assets=[a for a in in_groups("market_data", "statistics", "datasets", "models")
                                  if not isinstance(a, dg.AssetChecksDefinition)], resources=resources)
    # what the UI and the code server ship: resource config, job snapshots, run config schemas
    snapshot = serialize_value(RepositorySnap.from_def(defs.get_repository_def()))
    assert "hf_canary" not in snapshot and "canary_password" not in snapshot and "canary_mlflow" not in snapshot
    assert '"HF_TOKEN"' in snapshot and '"FINPIPE_YAHOO_PROXY"' in snapshot  # referenced by name only
    assert '"FINPIPE_MLFLOW_TRACKING_URI"' in snapshot
    # ...and resolved when a run initializes the resources
    assert resources["huggingface"].process_config_and_initialize().token == "hf_canary_token_for_the_test"
    assert resources["market_data"].process_config_and_initialize().yahoo_proxy.endswith("@proxy.corp:3128")
    assert resources["tracking"].process_config_and_initialize().tracking_uri.endswith("canary_mlflow@mlflow.corp")
    # without the variables there is nothing to leak and nothing required
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("FINPIPE_YAHOO_PROXY")
    assert build_resources()["huggingface"].token == "" and build_resources()["market_data"].yahoo_proxy == ""


def test_no_pickle_loading_and_no_remote_code_anywhere_in_finpipe():
    """Every checkpoint load goes through finpipe.models.safe_loading; no pickle, no torch.load without
    weights_only=True, trust_remote_code never True."""
    for path in (REPO_ROOT / "finpipe").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "dill", "joblib", "cloudpickle"} & set(names), f"{path}:{node.lineno}"
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            kwargs = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
            remote = kwargs.get("trust_remote_code")
            assert remote is None or (isinstance(remote, ast.Constant) and remote.value is False), where
            if node.func.attr == "load" and getattr(node.func.value, "id", "") == "torch":
                assert isinstance(kwargs.get("weights_only"), ast.Constant) and kwargs["weights_only"].value is True, where
            if node.func.attr == "from_pretrained" and path.name != "safe_loading.py":
                owner = getattr(node.func.value, "id", "")
                allowed = "gguf_file" in kwargs or (owner == "AutoConfig" and "trust_remote_code" in kwargs)
                assert allowed, f"{where}: load checkpoints through finpipe.models.safe_loading"
