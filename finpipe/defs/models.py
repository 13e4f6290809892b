"""Model assets: the base model, finpipe's own scratch GPT, and the (Q)LoRA adapter."""

import datetime as dt
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field

from finpipe.defs.config import config_class
from finpipe.defs.datasets import check_split_files, dataset_files, dataset_split
from finpipe.defs.metadata import markdown_table, tracking_metadata
from finpipe.defs.resources import HuggingFaceResource, LakeResource, TrackingResource
from finpipe.models import registry
from finpipe.models.files import file_digest, folder_size
from finpipe.models.scratch import ScratchGPTSpec
from finpipe.training.spec import AdapterSpec

#: what base_model downloads from the hub: configs, safetensors weights, tokenizer files, chat templates; never
#: pickles (*.bin, *.pt, *.pth, *.ckpt) and never code (*.py: remote code stays off)
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


class BaseModelConfig(dg.Config):
    model: str = Field(
        default="smollm2",
        description="'smollm2' (embedded SmolLM2-135M-Instruct), 'scratch' (finpipe's own GPT), "
        "a Hugging Face model id (e.g. TinyLlama/TinyLlama-1.1B-Chat-v1.0) or a local folder",
    )
    revision: str = Field(default="main", description="hub revision for a model id")


@dg.asset(
    group_name="models",
    kinds={"pytorch"},
    description="The base causal LM as a plain Hugging Face folder in the lake (models/base/...); "
    "models/base/current.json names it.",
)
def base_model(context: dg.AssetExecutionContext, config: BaseModelConfig, lake: LakeResource,
               huggingface: HuggingFaceResource) -> dg.MaterializeResult:
    base_root = registry.models_dir(lake.directory) / "base"
    if config.model == "smollm2":
        from finpipe.models import smollm2

        folder = base_root / smollm2.MODEL_NAME
        if not (folder / "config.json").exists() or not (folder / "model.safetensors").exists():
            context.log.info("converting the embedded SmolLM2 GGUF into a plain HF folder (once)")
            from finpipe.runtime import heartbeat

            with heartbeat(context.log.info, "converting SmolLM2"):
                smollm2.materialize_hf_folder(folder)
        name = smollm2.MODEL_NAME
    elif config.model == "scratch":
        folder = registry.models_dir(lake.directory) / "scratch_gpt"
        if not (folder / "config.json").exists():
            raise dg.Failure("base 'scratch' needs the scratch_gpt asset: materialize it first")
        name = "finpipe-scratch-gpt"
    elif Path(config.model).expanduser().exists():
        folder, name = Path(config.model).expanduser().resolve(), Path(config.model).name
    else:
        from huggingface_hub import snapshot_download

        folder = base_root / config.model.replace("/", "__")
        snapshot_download(config.model, revision=config.revision, local_dir=folder, token=huggingface.token or None,
                          allow_patterns=HUB_ALLOW_PATTERNS)
        name = config.model
    from transformers import AutoConfig

    from finpipe.models.safe_loading import UnsafeCheckpointError, load_tokenizer, require_safetensors_model

    try:
        require_safetensors_model(folder)  # a hub repo without safetensors downloads no weights at all
    except UnsafeCheckpointError as exc:
        raise dg.Failure(str(exc)) from exc
    model_config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    tokenizer = load_tokenizer(folder)
    if not tokenizer.chat_template:
        raise dg.Failure(f"{name} has no chat template: finpipe trains on chat messages")
    registry.write_pointer(registry.base_pointer(lake.directory), {"name": name, "path": str(folder)})
    return dg.MaterializeResult(metadata={
        "name": name,
        "path": dg.MetadataValue.path(str(folder)),
        "architecture": ", ".join(model_config.architectures or []),
        "layers": getattr(model_config, "num_hidden_layers", None),
        "hidden_size": getattr(model_config, "hidden_size", None),
        "vocab_size": len(tokenizer),
        "size_mb": round(folder_size(folder) / 2**20, 1),
        "chat_template_has_generation_markers": "{% generation %}" in tokenizer.chat_template,
    })


ScratchGPTConfig = config_class(ScratchGPTSpec, "ScratchGPTConfig", only=(
    "steps", "hidden_size", "num_layers", "vocab_size", "seq_len", "batch_size", "learning_rate", "seed"))


@dg.asset(
    deps=[dataset_split],
    group_name="scratch",
    kinds={"pytorch"},
    description="A small Llama-architecture GPT pretrained from scratch (own BPE tokenizer) on the training "
    "split's finance text; reports validation perplexity against the untrained model.",
)
def scratch_gpt(context: dg.AssetExecutionContext, config: ScratchGPTConfig, lake: LakeResource) -> dg.MaterializeResult:
    from finpipe.instructions.samples import read_jsonl
    from finpipe.models.scratch import pretrain
    from finpipe.training.plots import loss_curve_png, markdown_image

    spec = ScratchGPTSpec(**config.model_dump())
    text = lambda s: f"{s.text_of('user')}\n{s.text_of('assistant')}"  # noqa: E731
    files = dataset_files(lake)
    train, val = [text(s) for s in read_jsonl(files.train)], [text(s) for s in read_jsonl(files.val)]
    target = registry.models_dir(lake.directory) / "scratch_gpt"
    report = pretrain(train, val, target, spec, log=context.log.info)
    png = loss_curve_png(list(enumerate(report.losses, 1)), [], target / "loss.png", "scratch GPT pretraining")
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(target)),
        "parameters": report.parameters,
        "val_perplexity_untrained": report.initial_val_perplexity,
        "val_perplexity_trained": report.final_val_perplexity,
        "train_tokens": report.train_tokens,
        "tokens_per_s": report.tokens_per_s,
        "seconds": report.seconds,
        "precision": report.dtype,
        "loss_curve": dg.MetadataValue.md(markdown_image(png, "loss")),
    })


AdapterTrainingConfig = config_class(
    AdapterSpec, "AdapterTrainingConfig",
    extra={"warm_start": (str, Field(default="none", description="'none' = fresh LoRA; 'champion' = continue from "
                                     "the champion adapter's weights when it was trained on the same base (the "
                                     "nightly run does)"))},
)


@dg.asset(
    deps=[base_model, dataset_split],
    group_name="models",
    kinds={"pytorch"},
    description="A (Q)LoRA adapter trained with TRL's SFTTrainer on the training split (loss on assistant "
    "tokens only, label-balanced batches grouped by length, cosine schedule within a time budget, evaluations + "
    "early stopping + best checkpoint), saved as a standard PEFT folder in models/adapters/<run id>; "
    "models/adapters/latest.json names the newest. QLoRA (4-bit base) on CUDA, plain LoRA on a CPU by default.",
)
def qlora_adapter(context: dg.AssetExecutionContext, config: AdapterTrainingConfig,
                  lake: LakeResource, tracking: TrackingResource) -> dg.MaterializeResult:
    from finpipe.instructions.samples import read_jsonl
    from finpipe.training.plots import loss_curve_png, markdown_image
    from finpipe.training.sft import train_adapter

    if config.warm_start not in ("none", "champion"):
        raise dg.Failure(f"warm_start must be 'none' or 'champion', got {config.warm_start!r}")
    spec = AdapterSpec(**config.model_dump(exclude={"warm_start"}))  # validates every knob before any work
    check_split_files(lake)  # a truncated or edited split is refused, not trained on
    base = registry.read_pointer(registry.base_pointer(lake.directory))
    init_adapter, init_tokens = (registry.warm_start(lake.directory, base, log=context.log.info)
                                 if config.warm_start == "champion" else (None, 0))
    files = dataset_files(lake)
    train_path, val_path = files.train, files.val
    # the job is identified by what it trains on (file content, not its modification time): a rerun with the same
    # spec, data and base resumes its checkpoints
    fingerprint = spec.fingerprint(base["path"], file_digest(train_path), str(init_adapter))
    adapters = registry.adapters_dir(lake.directory)
    job_dir = adapters / "_jobs" / fingerprint
    run_id = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{context.run_id[:8]}"
    adapter_dir = adapters / run_id
    if spec.processes > 1:  # the same training under torch.distributed.run, one rank per process (or GPU)
        from finpipe.training.launch import train_in_processes

        report = train_in_processes(base["path"], train_path, val_path, job_dir, adapter_dir, spec,
                                    log=context.log.info, init_adapter=init_adapter, init_tokens=init_tokens)
    else:
        report = train_adapter(base["path"], read_jsonl(train_path), read_jsonl(val_path), job_dir, adapter_dir,
                               spec, log=context.log.info, init_adapter=init_adapter, init_tokens=init_tokens)
    png = loss_curve_png(report.train_losses, report.eval_losses, adapter_dir / "loss.png",
                         f"{'QLoRA' if report.quantization == 'nf4' else 'LoRA'} adapter on {base['name']}")
    registry.write_pointer(registry.latest_adapter_pointer(lake.directory),
                           {"run_id": run_id, "path": str(adapter_dir), "base": base, "fingerprint": fingerprint})
    shutil.rmtree(job_dir, ignore_errors=True)  # finished: checkpoints are only needed to resume
    tracked = _track_training(context, tracking, lake, spec, config.warm_start, report, run_id, adapter_dir,
                              base["name"]) if tracking.enabled else {}
    train_curve = pl.DataFrame(report.train_losses, schema={"step": pl.Int64, "train_loss": pl.Float64}, orient="row")
    val_curve = pl.DataFrame(report.eval_losses, schema={"step": pl.Int64, "val_loss": pl.Float64},
                             orient="row").unique("step", keep="last", maintain_order=True)
    curves = markdown_table(train_curve.join(val_curve, on="step", how="full", coalesce=True).sort("step"), max_rows=60)
    return dg.MaterializeResult(metadata={
        "run_id": run_id,
        "path": dg.MetadataValue.path(str(adapter_dir)),
        "base_model": base["name"],
        "quantization": report.quantization,
        "trained_as": "QLoRA (4-bit NF4 base)" if report.quantization == "nf4" else "LoRA (unquantized base)",
        "method": report.method,
        "trainable_params": report.trainable_params,
        "total_params": report.total_params,
        "initial_val_loss": report.initial_eval_loss,
        "best_val_loss": report.best_eval_loss,
        "val_loss_samples": spec.max_val_samples,  # the training's own small held-out sample, not the evaluation's
        "steps": report.steps,
        "processes": report.processes,
        "stopped_early": report.stopped_early,
        "resumed_from": report.resumed_from or "",
        "warm_start": report.warm_start or "",
        "train_tokens": report.train_tokens,
        "tokens_per_s": report.tokens_per_s,
        "wall_time_s": report.seconds,
        "peak_memory_mb": report.peak_memory_mb,
        "peak_rss_delta_mb": report.peak_rss_delta_mb,
        "adapter_size_mb": round(report.adapter_bytes / 2**20, 2),
        "device": report.device,
        "precision": report.precision,
        "device_note": report.device_note,
        "device_plan": dg.MetadataValue.json(report.device_plan),
        "max_seq_len": report.max_seq_len,
        "stopped_by": report.stopped_by or "early stopping",
        "train_samples": report.train_samples,
        "cumulative_train_tokens": report.cumulative_train_tokens,
        "learning_curve": dg.MetadataValue.md(markdown_table(pl.DataFrame(report.curve), max_rows=30))
        if report.curve else "",
        "loss_curve": dg.MetadataValue.md(markdown_image(png, "loss curves")),
        "losses": dg.MetadataValue.md(curves),
        "tensorboard": dg.MetadataValue.path(str(adapter_dir / "tensorboard")),
        **tracked,
    })


def _track_training(context: dg.AssetExecutionContext, tracking: TrackingResource, lake: LakeResource,
                    spec: AdapterSpec, warm_start: str, report, run_id: str, adapter_dir: Path, base_name: str) -> dict:
    """The adapter's MLflow run (finpipe.tracking.log_training), as this asset's metadata: the run's link, or what
    could not be logged. Never raises."""
    import dataclasses
    import json

    from finpipe.market.snapshots import list_snapshots
    from finpipe.tracking import TrainingRecord, code_version, log_training, spec_params

    files = dataset_files(lake)
    train = json.loads(files.split_manifest.read_text())["files"]["train"]
    newest = next(iter(list_snapshots(lake.db_path)), None)
    record = TrainingRecord(
        adapter_run_id=run_id, adapter_dir=adapter_dir, params=spec_params(spec, warm_start=warm_start),
        report=dataclasses.asdict(report), base_model=base_name, dataset_name="finpipe-train", dataset_path=files.train,
        dataset_digest=train["sha256"], dataset_rows=train["samples"], dagster_run_id=context.run_id,
        lake_snapshot=newest.name if newest else "none", code_version=code_version())
    outcome = log_training(tracking.spec(), lake.directory, record, warn=context.log.warning)
    if outcome.run_id and not outcome.missing:
        context.log.info(f"MLflow run {outcome.run_id}, model version {outcome.model_version}: {outcome.url}")
    return tracking_metadata(outcome.summary())
