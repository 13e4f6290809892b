"""Every training knob, validated before any work starts."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from finpipe.settings import non_finite, setting

# "auto": QLoRA (4-bit NF4 base) on CUDA, plain LoRA on CPU, where 4-bit costs time (finpipe.training.device)
QUANTIZATIONS = ("auto", "nf4", "none")
GRADIENT_CHECKPOINTING = ("auto", "on", "off")
LR_SCHEDULES = ("cosine", "linear", "constant")  # auto: on only when the activations would not fit comfortably
# PEFT methods (peft's LoraConfig, LoraConfig(use_dora=True), AdaLoraConfig, VBLoRAConfig, IA3Config); orthogonal to
# `quantization`: QLoRA = method "lora" + quantization "nf4". See finpipe.training.peft_methods.
METHODS = ("lora", "adalora", "vblora", "dora", "ia3")


@dataclass(frozen=True)
class AdapterSpec:
    """Every training knob: its name, default and help are declared here once; the Dagster run config
    (``AdapterTrainingConfig``) and the command-line options are derived from these fields."""

    quantization: str = setting("auto", "'auto' (QLoRA on CUDA, plain LoRA on CPU, where 4-bit costs time), "
                                "'nf4' (QLoRA: 4-bit NF4 base, double quantization) or 'none' (plain LoRA)")
    method: str = setting("lora", "PEFT method: 'lora' (+ nf4 = QLoRA), 'dora', 'adalora', 'vblora' or 'ia3'")
    lora_r: int = setting(16, "rank of lora, dora and vblora (adalora uses adalora_init_r/target_r; ia3 has none)")
    lora_alpha: int = setting(32, "scaling of lora, dora and adalora")
    lora_dropout: float = setting(0.0, "dropout of lora, dora, adalora and vblora (0 is faster; the sweep found no "
                                  "gain from dropout)")
    target_modules: str = setting("all-linear", "'all-linear' or a comma-separated list, e.g. 'q_proj,v_proj'")
    lora_layer_share: float = setting(0.5, "share of the transformer layers adapted, counted from the top (1 = all; "
                                      "lora and dora): backpropagation stops below them, so a step costs less (the "
                                      "top half: 1.8x the steps in a CPU budget and better strict metrics, "
                                      "docs/training-sweep.md)")
    learning_rate: float = setting(1e-3, "peak learning rate (chosen by the sweep, docs/training-sweep.md: 2e-3 "
                                   "learns finance as fast but forgets general skills)")
    # The budget (finpipe.training.budget): training stops when any limit is reached, and the schedule follows it.
    max_minutes: float = setting(2.5, "wall-time budget of the training loop, in minutes (0 = no time limit); "
                                 "sized so the Quickstart's first line stays under 10 minutes on 2 CPU cores")
    max_steps: int = setting(0, "optimizer steps (0 = no step limit)")
    max_epochs: float = setting(3.0, "passes over the label-balanced training set (0 = no epoch limit)")
    batch_size: int = setting(2, "samples per optimizer step and device (on a CPU budget, more steps beat bigger "
                              "batches: docs/training-sweep.md)")
    grad_accum: int = setting(1, "gradient accumulation steps")
    max_seq_len: int = setting(0, "tokens per sample (0 = fitted to the longest training sample)")
    lr_schedule: str = setting("cosine", "learning rate after warmup, over the budget's progress: 'cosine' (to 0), "
                               "'linear' (to 0) or 'constant'")
    warmup_ratio: float = setting(0.05, "share of the budget spent warming the learning rate up")
    eval_points: int = setting(2, "evaluations (validation loss, learning curve, checkpoint) spread over the budget; "
                               "not charged to it")
    early_stopping_patience: int = setting(2, "evaluations without a better validation loss before stopping "
                                           "(0 = never stop early)")
    packing: bool = setting(False, "best-fit packing (padding-free); on a CPU, grouping by length is faster")
    group_by_length: bool = setting(True, "batch samples of similar length together: almost no padding")
    balance_labels: bool = setting(True, "resample the training split so each family's label values are equally "
                                   "frequent (the rules are learned from their rare cases)")
    general_replay_share: float = setting(0.5, "share of training samples that are general prompts the base model "
                                          "answered right, so the adapter does not forget general skills (0 = "
                                          "finance only; the answers are short, so half the samples cost ~15% of "
                                          "the tokens)")
    gradient_checkpointing: str = setting("auto", "'auto' (on only when activations would take over 30% of the "
                                          "free memory), 'on' or 'off'")
    max_train_samples: int = setting(0, "cap on training samples (0 = all)")
    max_val_samples: int = setting(16, "validation samples for the loss at each evaluation")
    curve_answers_per_family: int = setting(1, "greedy validation answers per family scored strictly at each "
                                            "evaluation: the learning curve (0 = loss only)")
    logging_steps: int = setting(5, "steps between training-loss logs")
    seed: int = setting(42, "seed of initialization, data order and balancing")
    processes: int = setting(1, "training processes (DDP ranks: one per GPU on CUDA, gloo ranks on a CPU), each "
                                "training batch_size samples per step; above 1 the training runs under "
                                "torch.distributed.run (finpipe.training.launch)")
    # AdaLoRA: every targeted matrix starts at rank adalora_init_r; the total budget shrinks (cubic schedule) to an
    # average of adalora_target_r per matrix. The schedule is given as fractions of max_steps: no reallocation for the
    # first tinit steps, then budgeting, the last tfinal steps (>= 1) train the final ranks; reallocate every deltaT.
    adalora_init_r: int = setting(24, "AdaLoRA: starting rank per matrix")
    adalora_target_r: int = setting(16, "AdaLoRA: final average rank per matrix (< adalora_init_r)")
    adalora_tinit_frac: float = setting(0.1, "AdaLoRA: fraction of max_steps before ranks are reallocated")
    adalora_tfinal_frac: float = setting(0.2, "AdaLoRA: fraction of max_steps trained at the final ranks")
    adalora_delta_t_frac: float = setting(0.01, "AdaLoRA: reallocation interval, fraction of max_steps (>= 1 step)")
    # VB-LoRA: one shared bank of num_vectors vectors of vector_length (must divide the in and out features of every
    # targeted module, checked when the model is known); each sub-vector mixes the top-k bank vectors. The final
    # adapter keeps only the top-k indices and weights (small); Trainer checkpoints keep the full logits (resume).
    vblora_num_vectors: int = setting(256, "VB-LoRA: vectors in the bank")
    vblora_vector_length: int = setting(64, "VB-LoRA: vector length, must divide the targeted in/out features")
    vblora_topk: int = setting(2, "VB-LoRA: bank vectors mixed per sub-vector")

    def __post_init__(self) -> None:
        if problems := non_finite(self):  # NaN slips through every range check below
            raise ValueError("invalid training config: " + "; ".join(problems))
        problems = []
        if self.quantization not in QUANTIZATIONS:
            problems.append(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.method not in METHODS:
            problems.append(f"method must be one of {METHODS}, got {self.method!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.gradient_checkpointing not in GRADIENT_CHECKPOINTING:
            problems.append(f"gradient_checkpointing must be one of {GRADIENT_CHECKPOINTING}, "
                            f"got {self.gradient_checkpointing!r}")
        for name in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "eval_points", "logging_steps",
                     "processes"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_minutes", "max_steps", "max_epochs", "max_seq_len", "curve_answers_per_family"):
            if not getattr(self, name) >= 0:  # also rejects NaN
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.max_minutes > 0 or self.max_steps > 0 or self.max_epochs > 0):
            problems.append("no training budget: set max_minutes, max_steps or max_epochs above 0")
        if 0 < self.max_seq_len < 32:
            problems.append(f"max_seq_len must be 0 (fitted to the data) or >= 32, got {self.max_seq_len}")
        if self.learning_rate <= 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 < self.lora_layer_share <= 1:
            problems.append(f"lora_layer_share must be in (0, 1], got {self.lora_layer_share}")
        if not 0 <= self.general_replay_share < 1:
            problems.append(f"general_replay_share must be in [0, 1), got {self.general_replay_share}")
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
        if self.method == "adalora" and self.max_steps <= 0:
            problems.append("method adalora needs max_steps > 0: its rank schedule is counted in steps")
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


def _length(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> int:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def fit_sequence_length(spec: AdapterSpec, tokenizer, conversations: list[list[dict[str, str]]]) -> tuple[int, int]:
    """(max_seq_len to train with, longest prompt). ``spec.max_seq_len`` 0 fits the longest conversation (rounded up
    to a multiple of 8); a set value must leave room for an answer after the longest prompt."""
    longest_prompt = max(_length(tokenizer, c[:-1], True) for c in conversations)
    if spec.max_seq_len == 0:
        longest = max(_length(tokenizer, c, False) for c in conversations)
        return -(-longest // 8) * 8, longest_prompt
    if longest_prompt >= spec.max_seq_len:
        raise ValueError(
            f"max_seq_len {spec.max_seq_len} is below the longest prompt template ({longest_prompt} tokens with the "
            f"chat template): raise max_seq_len (or 0 to fit the data) or shorten the prompts"
        )
    return spec.max_seq_len, longest_prompt
