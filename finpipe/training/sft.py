"""Train a PEFT adapter (LoRA / QLoRA, DoRA, AdaLoRA, VB-LoRA, IA3: see ``peft_methods``) with TRL's SFTTrainer
on chat samples, resumably and atomically.

Layout of a job (``job_dir``, one per spec + data + base fingerprint):
    job_dir/checkpoint-N/     Trainer checkpoints (adapter + optimizer + scheduler + RNG state)
    job_dir/runs/             TensorBoard event files
The finished adapter is written to ``adapter_dir`` through a temp folder and one rename, so a crash or
an interruption never leaves a half-written adapter and never touches an earlier one. Rerunning the
same job after an interruption resumes from the newest checkpoint.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from finpipe.instructions.samples import Sample
from finpipe.models.files import atomic_dir, folder_size
from finpipe.training.bnb_guard import disable_cpu_repacking
from finpipe.training.device import DevicePlan, plan_device
from finpipe.training.memory import RssPeak
from finpipe.training.spec import AdapterSpec, check_prompt_budget


@dataclass
class TrainReport:
    adapter_dir: str
    base_model: str
    quantization: str
    device: str
    precision: str
    device_note: str
    trainable_params: int
    total_params: int
    steps: int
    resumed_from: str | None
    stopped_early: bool
    best_eval_loss: float | None
    initial_eval_loss: float | None
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    train_tokens: int = 0
    tokens_per_s: float = 0.0
    seconds: float = 0.0
    peak_memory_mb: float = 0.0  # process lifetime (ru_maxrss on CPU): includes everything before this training
    adapter_bytes: int = 0
    longest_prompt_tokens: int = 0
    warm_start: str | None = None
    spec: dict = field(default_factory=dict)
    method: str = "lora"  # the PEFT method that trained (a warm-start adapter's own method wins over the spec's)
    peak_rss_delta_mb: float = 0.0  # peak resident memory during trainer.train() above the RSS when it started
    method_facts: dict = field(default_factory=dict)  # e.g. AdaLoRA's final and initial total rank


def load_base(base_dir: str | Path, quantization: str, plan: DevicePlan):
    """The base model, 4-bit NF4 (double quantization) or unquantized, on the planned device."""
    import torch
    from transformers import BitsAndBytesConfig

    from finpipe.models.safe_loading import load_causal_lm

    dtype = getattr(torch, plan.compute_dtype)
    device = plan.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # one process per GPU (accelerate launch, torchrun)
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    kwargs: dict = {"dtype": dtype, "device_map": {"": device}}  # + safetensors only, no remote code
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    model = load_causal_lm(base_dir, **kwargs)
    if quantization == "nf4":
        disable_cpu_repacking(model)
    return model


def count_parameters(model) -> int:
    """Logical parameter count: a 4-bit ``Params4bit`` tensor packs two weights per stored byte."""
    return sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())


def _peak_memory_mb(plan: DevicePlan) -> float:
    if plan.device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def last_complete_checkpoint(job_dir: Path, log=print) -> str | None:
    """The newest ``checkpoint-N`` in ``job_dir`` whose trainer state was saved, or None.

    The Trainer writes a checkpoint in place (adapter weights, optimizer, scheduler, RNG state, ``trainer_state.json``
    last), so a process killed while saving leaves a checkpoint without its state. transformers' own
    ``get_last_checkpoint`` picks it and ``train(resume_from_checkpoint=...)`` then fails on the missing state, on
    every retry. Such a checkpoint is skipped: the rerun resumes from the one before and saves that step again.
    """
    if not job_dir.is_dir():
        return None
    complete = []
    for folder in job_dir.glob("checkpoint-*"):
        step = folder.name.removeprefix("checkpoint-")
        if not step.isdigit() or not folder.is_dir():
            continue
        try:
            json.loads((folder / "trainer_state.json").read_text())
        except (OSError, ValueError):
            log(f"skipping the incomplete checkpoint {folder} (interrupted while it was being saved)")
            continue
        complete.append((int(step), str(folder)))
    return max(complete)[1] if complete else None


def train_adapter(
    base_dir: str | Path,
    train: Sequence[Sample],
    val: Sequence[Sample],
    job_dir: Path,
    adapter_dir: Path,
    spec: AdapterSpec,
    callbacks: Sequence = (),
    log=print,
    init_adapter: str | Path | None = None,
) -> TrainReport:
    """Train and save an adapter. ``init_adapter``: continue from an existing adapter's weights (warm start,
    e.g. the champion: the nightly run refines yesterday's adapter on the new data); its method and shape win.
    ``spec.method`` picks the PEFT method (``finpipe.training.peft_methods.build_peft_config``)."""
    import datasets
    from peft import prepare_model_for_kbit_training
    from transformers import EarlyStoppingCallback
    from trl import SFTConfig, SFTTrainer

    from finpipe.models.safe_loading import load_peft_adapter, load_tokenizer
    from finpipe.training import peft_methods

    tokenizer = load_tokenizer(base_dir)
    if spec.max_train_samples:
        train = list(train)[: spec.max_train_samples]
    if spec.max_val_samples:
        val = list(val)[: spec.max_val_samples]
    if not train or not val:
        raise ValueError(f"need training and validation samples, got {len(train)} and {len(val)}")
    longest = check_prompt_budget(spec, tokenizer, [s.messages[:-1] for s in (*train, *val)])

    plan = plan_device()
    log(f"training on {plan.note}")
    model = load_base(base_dir, spec.quantization, plan)
    total_params = count_parameters(model)
    if spec.quantization == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
    method = spec.method
    if init_adapter is None:
        peft_config = peft_methods.build_peft_config(spec, model)
    else:
        log(f"warm start from {init_adapter}")
        model = load_peft_adapter(model, init_adapter, is_trainable=True)
        peft_config = None  # the adapter is already attached
        method = peft_methods.method_of(model.peft_config["default"])
        if method != spec.method:
            log(f"warm start: the adapter is {method}, not {spec.method}: training it as {method}")
    method_callbacks = peft_methods.prepare_training(method, model if init_adapter is not None else None, log=log)

    to_ds = lambda samples: datasets.Dataset.from_list([{"messages": s.messages} for s in samples])  # noqa: E731
    job_dir.mkdir(parents=True, exist_ok=True)
    config = SFTConfig(
        output_dir=str(job_dir),
        max_steps=spec.max_steps,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, round(spec.warmup_ratio * spec.max_steps)) if spec.warmup_ratio else 0,
        eval_strategy="steps",
        eval_steps=spec.eval_steps,
        save_strategy="steps",
        save_steps=spec.eval_steps,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=spec.logging_steps,
        report_to=[],  # TensorBoard through the explicit callback below
        max_length=spec.max_seq_len,
        packing=spec.packing,
        assistant_only_loss=True,
        gradient_checkpointing=spec.gradient_checkpointing,
        bf16=plan.bf16,
        fp16=plan.fp16,
        use_cpu=plan.device == "cpu",
        optim=plan.optimizer,
        seed=spec.seed,
        data_seed=spec.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        dataset_num_proc=None,
    )
    # An explicit writer: transformers' own TensorBoard callback opens its writer at the first log call, and
    # the initial evaluate() below logs before train() sets its directory, so it wrote into ./runs (cwd).
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    # with several processes (accelerate launch, torchrun) only the first one logs and writes the adapter
    main_process = config.process_index == 0
    tensorboard = TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(job_dir / "runs")) if main_process else None)
    trainer = peft_methods.trainer_class(method, SFTTrainer)(
        model=model, args=config, train_dataset=to_ds(train), eval_dataset=to_ds(val), processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[tensorboard,
                   *([EarlyStoppingCallback(spec.early_stopping_patience)] if spec.early_stopping_patience else []),
                   *method_callbacks, *callbacks],
    )
    if spec.quantization == "nf4":
        peft_methods.restore_fp32(trainer.model, replace(spec, method=method))  # after TRL's bf16 cast
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    resume = last_complete_checkpoint(job_dir, log)
    initial_eval = None
    if resume is None:
        initial_eval = trainer.evaluate()["eval_loss"]
        log(f"initial eval loss {initial_eval:.4f}")
    else:
        log(f"resuming from {resume}")
    started = time.perf_counter()
    with RssPeak() as rss:
        result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    final_eval = trainer.evaluate()["eval_loss"]  # the best checkpoint, restored by load_best_model_at_end

    history = trainer.state.log_history
    train_losses = [(h["step"], round(h["loss"], 4)) for h in history if "loss" in h]
    eval_losses = [(h["step"], round(h["eval_loss"], 4)) for h in history if "eval_loss" in h]
    tokens = int(max([h.get("num_tokens", 0) for h in history] + [0]))
    if initial_eval is not None:  # train() starts a fresh log history: keep the step-0 evaluation in the curve
        eval_losses.insert(0, (0, round(initial_eval, 4)))

    if tensorboard.tb_writer is not None:
        tensorboard.tb_writer.close()
    method_facts = peft_methods.prepare_final_save(trainer.model, method, method_callbacks)
    report = TrainReport(
        adapter_dir=str(adapter_dir), base_model=str(base_dir), quantization=spec.quantization,
        device=plan.device, precision=plan.compute_dtype, device_note=plan.note, trainable_params=trainable,
        total_params=total_params, steps=trainer.state.global_step, resumed_from=resume,
        stopped_early=trainer.state.global_step < spec.max_steps, best_eval_loss=round(final_eval, 4),
        initial_eval_loss=None if initial_eval is None else round(initial_eval, 4),
        train_losses=train_losses, eval_losses=eval_losses, train_tokens=tokens,
        tokens_per_s=round(tokens / seconds, 1) if tokens and seconds else 0.0,
        seconds=round(seconds, 1), peak_memory_mb=round(_peak_memory_mb(plan), 1),
        adapter_bytes=0, longest_prompt_tokens=longest,
        warm_start=str(init_adapter) if init_adapter is not None else None, spec=asdict(spec), method=method,
        peak_rss_delta_mb=round(rss.delta_mb, 1), method_facts=method_facts,
    )
    if main_process:
        with atomic_dir(adapter_dir) as tmp:
            trainer.model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            if (job_dir / "runs").exists():
                shutil.copytree(job_dir / "runs", tmp / "tensorboard")
            report.adapter_bytes = folder_size(tmp)
            (tmp / "training_report.json").write_text(json.dumps(asdict(report), indent=2))
    trainer.accelerator.wait_for_everyone()
    report.adapter_bytes = folder_size(adapter_dir)
    del result
    return report


def load_adapter(base_dir: str | Path, adapter_dir: str | Path, quantization: str = "none"):
    """The plain PEFT way: base model + ``PeftModel.from_pretrained(base, adapter_dir)``."""
    from finpipe.models.safe_loading import load_peft_adapter

    base = load_base(base_dir, quantization, plan_device())
    return load_peft_adapter(base, adapter_dir)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
