"""Every training knob, validated before any work starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
import hashlib
import json

QUANTIZATIONS = ("nf4", "none")


@dataclass(frozen=True)
class AdapterSpec:
    quantization: str = "nf4"  # "nf4": QLoRA (4-bit NF4 base, double quantization); "none": plain LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str = "all-linear"  # or a comma-separated list, e.g. "q_proj,v_proj"
    learning_rate: float = 2e-4
    # defaults sized for the offline quickstart on 2 CPU cores (minutes); raise them on a GPU
    max_steps: int = 24
    batch_size: int = 2
    grad_accum: int = 1
    max_seq_len: int = 384
    warmup_ratio: float = 0.1
    eval_steps: int = 8
    early_stopping_patience: int = 3
    packing: bool = True
    gradient_checkpointing: bool = True
    max_train_samples: int = 0  # 0 = all
    max_val_samples: int = 16  # validation subset evaluated every eval_steps (CPU budget)
    logging_steps: int = 5
    seed: int = 42

    def __post_init__(self) -> None:
        problems = []
        if self.quantization not in QUANTIZATIONS:
            problems.append(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        for name in ("lora_r", "lora_alpha", "max_steps", "batch_size", "grad_accum", "max_seq_len", "eval_steps",
                     "logging_steps"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.early_stopping_patience < 0 or self.max_train_samples < 0 or self.max_val_samples < 0:
            problems.append("early_stopping_patience, max_train_samples and max_val_samples must be >= 0")
        if not self.target_modules.strip():
            problems.append("target_modules must name modules or be 'all-linear'")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    @property
    def target_modules_value(self) -> str | list[str]:
        if self.target_modules == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]

    def fingerprint(self, *extra: str) -> str:
        """Identifies a training job: same spec + same data + same base resume the same checkpoints."""
        payload = json.dumps([asdict(self), *extra], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def check_prompt_budget(spec: AdapterSpec, tokenizer, prompts: list[list[dict[str, str]]]) -> int:
    """The longest prompt (system + user + generation prompt) must leave room for an answer."""
    longest = 0
    for messages in prompts:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        n = len(ids["input_ids"] if hasattr(ids, "keys") else ids)
        longest = max(longest, n)
    if longest >= spec.max_seq_len:
        raise ValueError(
            f"max_seq_len {spec.max_seq_len} is below the longest prompt template ({longest} tokens with the "
            f"chat template): raise max_seq_len or shorten the prompts"
        )
    return longest
