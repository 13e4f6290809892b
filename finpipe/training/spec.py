"""Every training knob, validated before any work starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
import hashlib
import json

QUANTIZATIONS = ("nf4", "none")
# PEFT methods (peft's LoraConfig, LoraConfig(use_dora=True), AdaLoraConfig, VBLoRAConfig, IA3Config); orthogonal to
# `quantization`: QLoRA = method "lora" + quantization "nf4". See finpipe.training.peft_methods.
METHODS = ("lora", "adalora", "vblora", "dora", "ia3")


@dataclass(frozen=True)
class AdapterSpec:
    quantization: str = "nf4"  # "nf4": QLoRA (4-bit NF4 base, double quantization); "none": plain LoRA
    method: str = "lora"  # one of METHODS; "lora" + "nf4" = QLoRA
    lora_r: int = 16  # rank of lora, dora and vblora (adalora uses adalora_init_r / adalora_target_r; ia3 has none)
    lora_alpha: int = 32  # scaling of lora, dora and adalora
    lora_dropout: float = 0.05  # dropout of lora, dora, adalora and vblora
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
    # AdaLoRA: every targeted matrix starts at rank adalora_init_r; the total budget shrinks (cubic schedule) to an
    # average of adalora_target_r per matrix. The schedule is given as fractions of max_steps: no reallocation for the
    # first tinit steps, then budgeting, the last tfinal steps (>= 1) train the final ranks; reallocate every deltaT.
    adalora_init_r: int = 24
    adalora_target_r: int = 16
    adalora_tinit_frac: float = 0.1
    adalora_tfinal_frac: float = 0.2
    adalora_delta_t_frac: float = 0.01
    # VB-LoRA: one shared bank of num_vectors vectors of vector_length (must divide the in and out features of every
    # targeted module, checked when the model is known); each sub-vector mixes the top-k bank vectors. The final
    # adapter keeps only the top-k indices and weights (small); Trainer checkpoints keep the full logits (resume).
    vblora_num_vectors: int = 256
    vblora_vector_length: int = 64
    vblora_topk: int = 2

    def __post_init__(self) -> None:
        problems = []
        if self.quantization not in QUANTIZATIONS:
            problems.append(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.method not in METHODS:
            problems.append(f"method must be one of {METHODS}, got {self.method!r}")
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
        problems += self._method_problems()
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    def _method_problems(self) -> list[str]:
        problems = []
        for name in ("adalora_init_r", "adalora_target_r", "vblora_num_vectors", "vblora_vector_length", "vblora_topk"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if 0 < self.adalora_init_r <= self.adalora_target_r:
            problems.append(f"adalora_target_r ({self.adalora_target_r}) must be below adalora_init_r "
                            f"({self.adalora_init_r}): AdaLoRA only removes rank")
        for name in ("adalora_tinit_frac", "adalora_tfinal_frac", "adalora_delta_t_frac"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.adalora_tinit_frac + self.adalora_tfinal_frac >= 1:
            problems.append(f"adalora_tinit_frac + adalora_tfinal_frac must be < 1 to leave a budgeting phase, got "
                            f"{self.adalora_tinit_frac} + {self.adalora_tfinal_frac}")
        if self.vblora_topk > self.vblora_num_vectors > 0:
            problems.append(f"vblora_topk ({self.vblora_topk}) must be <= vblora_num_vectors "
                            f"({self.vblora_num_vectors})")
        if self.method == "adalora" and not problems and self.max_steps > 0:
            tinit, tfinal, _ = self.adalora_schedule()
            if tinit >= self.max_steps - tfinal:
                problems.append(f"the AdaLoRA schedule leaves no budgeting phase: max_steps {self.max_steps} gives "
                                f"tinit {tinit} and tfinal {tfinal} steps (tinit must be < max_steps - tfinal); "
                                "raise max_steps or lower adalora_tinit_frac / adalora_tfinal_frac")
        return problems

    def adalora_schedule(self) -> tuple[int, int, int]:
        """AdaLoRA's (tinit, tfinal, deltaT) in optimizer steps, from the fractions of max_steps. tfinal is at least
        1 so that the final allocation (peft's forced mask at step total_step - tfinal) happens during training."""
        tinit = round(self.adalora_tinit_frac * self.max_steps)
        tfinal = max(1, round(self.adalora_tfinal_frac * self.max_steps))
        delta_t = max(1, round(self.adalora_delta_t_frac * self.max_steps))
        return tinit, tfinal, delta_t

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
