"""Model assets: the base model, finpipe's own scratch GPT, and the (Q)LoRA adapter."""

import datetime as dt
import json
import os
from pathlib import Path

import shutil

import dagster as dg
import polars as pl
from pydantic import Field

from finpipe.defs.datasets import dataset_split, split_dir
from finpipe.defs.metadata import markdown_table
from finpipe.defs.resources import LakeResource
from finpipe.models import registry
from finpipe.models.files import folder_size
from finpipe.training.spec import AdapterSpec


#: what base_model downloads from the hub: configs, safetensors weights, tokenizer files, chat templates; never
#: pickles (*.bin, *.pt, *.pth, *.ckpt) and never code (*.py: remote code stays off)
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


class HuggingFaceResource(dg.ConfigurableResource):
    """Credentials for gated hub models (e.g. meta-llama/Llama-3.2-1B-Instruct): HF_TOKEN, never in config files."""

    token: str = ""


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


class ScratchGPTConfig(dg.Config):
    steps: int = Field(default=300, description="optimizer steps")
    hidden_size: int = 128
    num_layers: int = 4
    vocab_size: int = 4000
    seq_len: int = 256
    batch_size: int = 8
    learning_rate: float = 3e-3
    seed: int = 0


@dg.asset(
    deps=[dataset_split],
    group_name="models",
    kinds={"pytorch"},
    description="A small Llama-architecture GPT pretrained from scratch (own BPE tokenizer) on the training "
    "split's finance text; reports validation perplexity against the untrained model.",
)
def scratch_gpt(context: dg.AssetExecutionContext, config: ScratchGPTConfig, lake: LakeResource) -> dg.MaterializeResult:
    from finpipe.instructions.samples import read_jsonl
    from finpipe.models.scratch import ScratchConfig, pretrain
    from finpipe.training.plots import loss_curve_png, markdown_image

    spec = ScratchConfig(steps=config.steps, hidden_size=config.hidden_size, num_layers=config.num_layers,
                         vocab_size=config.vocab_size, seq_len=config.seq_len, batch_size=config.batch_size,
                         learning_rate=config.learning_rate, seed=config.seed)
    text = lambda s: f"{s.text_of('user')}\n{s.text_of('assistant')}"  # noqa: E731
    train = [text(s) for s in read_jsonl(split_dir(lake) / "train.jsonl")]
    val = [text(s) for s in read_jsonl(split_dir(lake) / "val.jsonl")]
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


class AdapterTrainingConfig(dg.Config):
    """The UI/run-config face of ``AdapterSpec``: same fields, same defaults (validated by AdapterSpec)."""

    quantization: str = Field(default=AdapterSpec.quantization, description="'nf4' = QLoRA (4-bit NF4 base), 'none' = plain LoRA")
    method: str = Field(default=AdapterSpec.method, description="PEFT method: 'lora' (+ nf4 = QLoRA), 'dora', "
                        "'adalora', 'vblora' or 'ia3'")
    lora_r: int = AdapterSpec.lora_r
    lora_alpha: int = AdapterSpec.lora_alpha
    lora_dropout: float = AdapterSpec.lora_dropout
    target_modules: str = Field(default=AdapterSpec.target_modules, description="'all-linear' or e.g. 'q_proj,v_proj'")
    learning_rate: float = AdapterSpec.learning_rate
    max_steps: int = AdapterSpec.max_steps
    batch_size: int = AdapterSpec.batch_size
    grad_accum: int = AdapterSpec.grad_accum
    max_seq_len: int = AdapterSpec.max_seq_len
    warmup_ratio: float = AdapterSpec.warmup_ratio
    eval_steps: int = AdapterSpec.eval_steps
    early_stopping_patience: int = AdapterSpec.early_stopping_patience
    packing: bool = AdapterSpec.packing
    gradient_checkpointing: bool = AdapterSpec.gradient_checkpointing
    max_train_samples: int = Field(default=AdapterSpec.max_train_samples, description="0 = the whole training split")
    max_val_samples: int = Field(default=AdapterSpec.max_val_samples, description="validation samples per evaluation")
    logging_steps: int = AdapterSpec.logging_steps
    seed: int = AdapterSpec.seed
    adalora_init_r: int = Field(default=AdapterSpec.adalora_init_r, description="AdaLoRA: starting rank per matrix")
    adalora_target_r: int = Field(default=AdapterSpec.adalora_target_r,
                                  description="AdaLoRA: final average rank per matrix (< adalora_init_r)")
    adalora_tinit_frac: float = Field(default=AdapterSpec.adalora_tinit_frac,
                                      description="AdaLoRA: fraction of max_steps before ranks are reallocated")
    adalora_tfinal_frac: float = Field(default=AdapterSpec.adalora_tfinal_frac,
                                       description="AdaLoRA: fraction of max_steps trained at the final ranks")
    adalora_delta_t_frac: float = Field(default=AdapterSpec.adalora_delta_t_frac,
                                        description="AdaLoRA: reallocation interval, fraction of max_steps (>= 1 step)")
    vblora_num_vectors: int = Field(default=AdapterSpec.vblora_num_vectors, description="VB-LoRA: vectors in the bank")
    vblora_vector_length: int = Field(default=AdapterSpec.vblora_vector_length,
                                      description="VB-LoRA: vector length, must divide the targeted in/out features")
    vblora_topk: int = Field(default=AdapterSpec.vblora_topk, description="VB-LoRA: bank vectors mixed per sub-vector")
    warm_start: str = Field(default="none", description="'none' = fresh LoRA; 'champion' = continue from the "
                            "champion adapter's weights when it was trained on the same base (the nightly run does)")


@dg.asset(
    deps=[base_model, dataset_split],
    group_name="models",
    kinds={"pytorch"},
    description="A (Q)LoRA adapter trained with TRL's SFTTrainer on the training split (loss on assistant "
    "tokens, packing, cosine schedule, eval + early stopping + best checkpoint), saved as a standard PEFT "
    "folder in models/adapters/<run id>; models/adapters/latest.json names the newest.",
)
def qlora_adapter(context: dg.AssetExecutionContext, config: AdapterTrainingConfig,
                  lake: LakeResource) -> dg.MaterializeResult:
    from finpipe.instructions.samples import read_jsonl
    from finpipe.training.plots import loss_curve_png, markdown_image
    from finpipe.training.sft import train_adapter

    if config.warm_start not in ("none", "champion"):
        raise dg.Failure(f"warm_start must be 'none' or 'champion', got {config.warm_start!r}")
    spec = AdapterSpec(**config.model_dump(exclude={"warm_start"}))  # validates every knob before any work
    base = registry.read_pointer(registry.base_pointer(lake.directory))
    init_adapter = None
    if config.warm_start == "champion":
        pointer = registry.champion_pointer(lake.directory)
        champion = registry.read_pointer(pointer) if pointer.exists() else None
        if champion is None:
            context.log.info("warm start: no champion yet, training a fresh adapter")
        elif champion["base"]["path"] != base["path"]:
            context.log.warning(f"warm start: the champion {champion['run_id']} was trained on "
                                f"{champion['base']['name']}, not {base['name']}: training a fresh adapter")
        else:
            init_adapter = champion["path"]
    train_path, val_path = split_dir(lake) / "train.jsonl", split_dir(lake) / "val.jsonl"
    fingerprint = spec.fingerprint(base["path"], str(os.path.getmtime(train_path)), str(train_path.stat().st_size),
                                   str(init_adapter))
    adapters = registry.adapters_dir(lake.directory)
    job_dir = adapters / "_jobs" / fingerprint
    run_id = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{context.run_id[:8]}"
    adapter_dir = adapters / run_id
    report = train_adapter(base["path"], read_jsonl(train_path), read_jsonl(val_path), job_dir, adapter_dir, spec,
                           log=context.log.info, init_adapter=init_adapter)
    png = loss_curve_png(report.train_losses, report.eval_losses, adapter_dir / "loss.png",
                         f"{spec.quantization} adapter on {base['name']}")
    registry.write_pointer(registry.latest_adapter_pointer(lake.directory),
                           {"run_id": run_id, "path": str(adapter_dir), "base": base, "fingerprint": fingerprint})
    shutil.rmtree(job_dir, ignore_errors=True)  # finished: checkpoints are only needed to resume
    train_curve = pl.DataFrame(report.train_losses, schema={"step": pl.Int64, "train_loss": pl.Float64}, orient="row")
    val_curve = pl.DataFrame(report.eval_losses, schema={"step": pl.Int64, "val_loss": pl.Float64},
                             orient="row").unique("step", keep="last", maintain_order=True)
    curves = markdown_table(train_curve.join(val_curve, on="step", how="full", coalesce=True).sort("step"), max_rows=60)
    return dg.MaterializeResult(metadata={
        "run_id": run_id,
        "path": dg.MetadataValue.path(str(adapter_dir)),
        "base_model": base["name"],
        "quantization": spec.quantization,
        "method": report.method,
        "trainable_params": report.trainable_params,
        "total_params": report.total_params,
        "initial_val_loss": report.initial_eval_loss,
        "best_val_loss": report.best_eval_loss,
        "steps": report.steps,
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
        "loss_curve": dg.MetadataValue.md(markdown_image(png, "loss curves")),
        "losses": dg.MetadataValue.md(curves),
        "tensorboard": dg.MetadataValue.path(str(adapter_dir / "tensorboard")),
    })


model_assets = [base_model, scratch_gpt, qlora_adapter]
