"""The PEFT method comparison: each method trained on the same split with the same budget (steps, batch,
sequence length, data), then scored the same way (loss and answers on the golden set, validation loss,
single-request latency) — so the table compares methods, not settings.

Methods: ``lora``, ``qlora`` (LoRA on a 4-bit NF4 base), ``adalora`` (rank budget shrinks from init to
target), ``vblora`` (shared vector bank), ``dora`` (weight-decomposed LoRA), ``ia3`` (learned rescaling).
Each method keeps its usual learning rate (IA3 and VB-LoRA train few parameters and need a larger one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from finpipe.evaluation.evaluate import quality_score
from finpipe.instructions.samples import Sample
from finpipe.settings import non_finite, setting

STUDY_METHODS = ("lora", "qlora", "adalora", "vblora", "dora", "ia3")
#: per-method learning rates (peft's examples); the rest use the study's ``learning_rate``
METHOD_LEARNING_RATES = {"ia3": 3e-3, "vblora": 1e-3}


@dataclass(frozen=True)
class PeftStudySpec:
    """The budget every PEFT method gets in the study (sized for 2 CPU cores: six methods in ~20 minutes)."""

    max_steps: int = setting(8, "optimizer steps per method")
    batch_size: int = setting(2, "samples per step")
    max_seq_len: int = setting(384, "tokens per sample")
    lora_r: int = setting(16, "rank of LoRA/QLoRA/DoRA/VB-LoRA; AdaLoRA starts at 1.5x and ends at this average rank")
    vblora_vector_length: int = setting(64, "VB-LoRA vector length (must divide every targeted layer's sizes)")
    learning_rate: float = setting(2e-4, "learning rate (IA3 and VB-LoRA use their own)")
    eval_points: int = setting(2, "evaluations (validation loss, checkpoint) during each method's training")
    max_val_samples: int = setting(8, "validation subset evaluated during training")
    loss_samples: int = setting(14, "validation samples for the study's loss")
    max_new_tokens: int = setting(64, "longest generated golden answer")
    seed: int = setting(42, "seed")

    def __post_init__(self) -> None:
        if problems := non_finite(self):
            raise ValueError("invalid PEFT study config: " + "; ".join(problems))
        for name in ("max_steps", "batch_size", "max_seq_len", "lora_r", "vblora_vector_length", "eval_points",
                     "max_val_samples",
                     "loss_samples", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"invalid PEFT study config: {name} must be > 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"invalid PEFT study config: learning_rate must be > 0, got {self.learning_rate}")


def method_spec(method: str, study: PeftStudySpec):
    """The ``AdapterSpec`` that trains ``method`` under the study's shared budget."""
    from finpipe.training.spec import AdapterSpec

    if method not in STUDY_METHODS:
        raise ValueError(f"unknown PEFT method {method!r}; the study covers {', '.join(STUDY_METHODS)}")
    return AdapterSpec(
        method="lora" if method == "qlora" else method,
        quantization="nf4" if method == "qlora" else "none",
        lora_r=study.lora_r, lora_alpha=2 * study.lora_r,
        adalora_init_r=study.lora_r + study.lora_r // 2, adalora_target_r=study.lora_r,
        vblora_vector_length=study.vblora_vector_length,
        learning_rate=METHOD_LEARNING_RATES.get(method, study.learning_rate),
        max_steps=study.max_steps, batch_size=study.batch_size, max_seq_len=study.max_seq_len,
        max_minutes=0, eval_points=study.eval_points, max_val_samples=study.max_val_samples, early_stopping_patience=0,
        curve_answers_per_family=0, general_replay_share=0.0,
        seed=study.seed,
    )


def run_method(method: str, base_dir: str | Path, train: Sequence[Sample], val: Sequence[Sample],
               golden: Sequence[Sample], out_dir: Path, study: PeftStudySpec,
               log: Callable[[str], None] = print) -> dict:
    """Train ``method`` into ``out_dir/adapter``, score it, and return its result row."""
    import shutil

    import torch

    from finpipe.evaluation.evaluate import assistant_loss, loss_subset, score_set
    from finpipe.evaluation.generation import Sampling, load_chat_model
    from finpipe.training.sft import train_adapter

    spec = method_spec(method, study)
    torch.manual_seed(study.seed)
    job_dir, adapter_dir = out_dir / "job", out_dir / "adapter"
    report = train_adapter(base_dir, train, val, job_dir, adapter_dir, spec, log=log)
    shutil.rmtree(job_dir, ignore_errors=True)
    model, tokenizer = load_chat_model(base_dir, adapter_dir)
    sampling = Sampling(max_new_tokens=study.max_new_tokens)
    log(f"{method}: scoring on the golden set ({len(golden)} answers)")
    scores = score_set(model, tokenizer, golden, golden, sampling, log)
    val_loss = round(assistant_loss(model, tokenizer, loss_subset(val, study.loss_samples, study.seed)), 4)
    adapter_file = adapter_dir / "adapter_model.safetensors"
    return {
        "method": method, "peft_method": spec.method, "quantization": spec.quantization,
        "learning_rate": spec.learning_rate, "steps": report.steps,
        "trainable_params": report.trainable_params, "total_params": report.total_params,
        "adapter_mb": round(adapter_file.stat().st_size / 2**20, 4),
        "train_seconds": report.seconds, "train_tokens_per_s": report.tokens_per_s,
        "peak_rss_delta_mb": getattr(report, "peak_rss_delta_mb", None), "peak_rss_mb": report.peak_memory_mb,
        "initial_val_loss": report.initial_eval_loss, "best_val_loss": report.best_eval_loss,
        "val_loss": val_loss, "golden_loss": scores.loss,
        **{f"golden_{k}": v for k, v in scores.overall.items()},
        "quality": quality_score(scores.overall),
        "latency_s": scores.latency_s, "generation_tokens_per_s": scores.tokens_per_s,
        "device": report.device, "precision": report.precision, "adapter_path": str(adapter_dir),
        "spec": dataclasses.asdict(spec),
    }
