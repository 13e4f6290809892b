"""Train a PEFT adapter (LoRA / QLoRA, DoRA, AdaLoRA, VB-LoRA, IA3: see ``peft_methods``) with TRL's SFTTrainer
on chat samples, within a budget, resumably and atomically.

``train_adapter`` reads top to bottom: prepare the data, plan the device, load the base and attach the adapter,
configure TRL, train within the budget, save atomically, report.

Layout of a job (``job_dir``, one per spec + data + base fingerprint):
    job_dir/checkpoint-N/     Trainer checkpoints (adapter + optimizer + scheduler + RNG state)
    job_dir/clock.json        the budget spent so far (a resumed run continues it)
    job_dir/curve.json        the learning curve so far
    job_dir/runs/             TensorBoard event files
The finished adapter is written to ``adapter_dir`` through a temp folder and one rename, so a crash or
an interruption never leaves a half-written adapter and never touches an earlier one. Rerunning the
same job after an interruption resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from finpipe.instructions.balance import balance_by_label
from finpipe.instructions.samples import Sample
from finpipe.models.files import atomic_dir, folder_size
from finpipe.training.budget import ScheduleReplay
from finpipe.training.device import DevicePlan, plan_device
from finpipe.training.launch import gpus_outnumbered, share_gpus_if_outnumbered
from finpipe.training.memory import RssPeak, cap_matmul_caches
from finpipe.training.spec import AdapterSpec, fit_sequence_length


@dataclass
class TrainReport:
    adapter_dir: str
    base_model: str
    quantization: str  # what trained: "nf4" (QLoRA) or "none" (LoRA), after resolving "auto"
    device: str
    precision: str
    device_note: str
    trainable_params: int
    total_params: int
    steps: int
    resumed_from: str | None
    stopped_early: bool  # early stopping on the validation loss ended training before the budget
    best_eval_loss: float | None
    initial_eval_loss: float | None
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    train_tokens: int = 0  # real (non-padding) tokens trained on in this run
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
    device_plan: dict = field(default_factory=dict)  # what was chosen for this machine, and why
    max_seq_len: int = 0  # the sequence length trained with (fitted to the data unless set)
    stopped_by: str | None = None  # the budget limit that ended training: time, steps or epochs
    curve: list[dict] = field(default_factory=list)  # learning curve: tokens, val loss, strict metrics
    cumulative_train_tokens: int = 0  # this run's tokens plus those of the adapter it warm-started from
    train_samples: int = 0  # after label balancing
    processes: int = 1  # the ranks that trained it (torch.distributed), each on its share of every global batch
    # the learning-rate factor of every scheduler step, as the budget's clock decided them (``ScheduleReplay``)
    lr_factors: list[float] = field(default_factory=list)


#: answer positions projected through the vocabulary at a time: a chunk's logits are the loss's only
#: vocabulary-sized tensor (512 x 49,152 fp32 = 96 MB for SmolLM2), whatever the batch, and none is kept for the
#: backward pass
LOSS_CHUNK_POSITIONS = 512


def _chunk_loss(head, hidden, target, with_grad: bool):
    """(summed cross-entropy, d loss / d logits or None) of one chunk of positions. The gradient, softmax minus the
    one-hot target, is computed in place in the fp32 logits: no log-probabilities tensor, no second buffer."""
    import torch

    logits = head(hidden).float()
    picked = logits.gather(1, target[:, None])
    top = logits.amax(1, keepdim=True)
    norm = logits.sub_(top).exp_().sum(1, keepdim=True)
    loss = (top + norm.log() - picked).sum()
    if not with_grad:
        return loss, None
    logits.div_(norm)
    logits.scatter_add_(1, target[:, None], torch.full_like(picked, -1.0))
    return loss, logits


@lru_cache(maxsize=None)
def _chunked_head_loss_class():
    import torch

    class ChunkedHeadLoss(torch.autograd.Function):
        """Summed cross-entropy of ``head(hidden)`` (a plain ``nn.Linear``; its weight and bias passed too, for their
        gradients) against ``target``, chunk by chunk, with the gradients computed during the forward pass (the loss
        is the last node of the graph): the backward pass only scales them, so no chunk's logits outlive their own
        iteration and none is recomputed."""

        @staticmethod
        def forward(ctx, hidden, weight, bias, head, target, chunk):
            grads = [torch.zeros_like(t, dtype=torch.float32) if t is not None and t.requires_grad else None
                     for t in (hidden, weight, bias)]
            total = hidden.new_zeros((), dtype=torch.float32)
            for start in range(0, len(target), chunk):
                part = slice(start, start + chunk)
                loss, dlogits = _chunk_loss(head, hidden[part], target[part], True)
                total += loss
                dlogits = dlogits.to(weight.dtype)
                if grads[0] is not None:
                    grads[0][part] = dlogits @ weight
                if grads[1] is not None:
                    grads[1] += dlogits.T @ hidden[part].to(weight.dtype)
                if grads[2] is not None:
                    grads[2] += dlogits.float().sum(0)
            ctx.grads = grads  # neither inputs nor outputs: plain attributes, not save_for_backward
            ctx.dtypes = [None if t is None else t.dtype for t in (hidden, weight, bias)]
            return total

        @staticmethod
        def backward(ctx, grad_total):
            scaled = [None if g is None else (g * grad_total).to(dtype) for g, dtype in zip(ctx.grads, ctx.dtypes)]
            return *scaled, None, None, None

    return ChunkedHeadLoss


def head_cross_entropy(head, hidden, target, chunk: int = LOSS_CHUNK_POSITIONS):
    """Summed cross-entropy of ``head(hidden)`` (the LM head, on the answer positions only) against ``target``,
    ``chunk`` positions at a time: whatever the number of positions, one chunk's logits exist at a time and the
    backward pass keeps none."""
    import torch

    zero = hidden.new_zeros((), dtype=torch.float32)
    if type(head) is not torch.nn.Linear:  # e.g. a quantized or adapted head: checkpointed chunks, recomputed
        from torch.utils.checkpoint import checkpoint

        def part_loss(h, t):
            return torch.nn.functional.cross_entropy(head(h).float(), t, reduction="sum")

        return sum((checkpoint(part_loss, hidden[i: i + chunk], target[i: i + chunk], use_reentrant=False)
                    for i in range(0, len(target), chunk)), zero)
    tracked = [t for t in (hidden, head.weight, head.bias) if t is not None]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tracked)):  # evaluation
        return sum((_chunk_loss(head, hidden[i: i + chunk], target[i: i + chunk], False)[0]
                    for i in range(0, len(target), chunk)), zero)
    return _chunked_head_loss_class().apply(hidden, head.weight, head.bias, head, target, chunk)


def answer_loss(model, inputs: dict, num_items_in_batch=None, chunk: int = LOSS_CHUNK_POSITIONS):
    """Cross-entropy on the answer tokens only, projecting only their positions through the vocabulary: the
    backbone's hidden states, the positions whose next token is a label, then the LM head on those alone,
    ``chunk`` positions at a time (``head_cross_entropy``). TRL's fused head does the same projection for every
    position and also computes entropy and top-1 statistics over the whole vocabulary for its logs: on a CPU that
    doubled the time of a step (benchmarks/training_throughput.py)."""
    import torch

    if isinstance(model, torch.nn.parallel.DistributedDataParallel):  # its forward is the whole LM: gradients are
        model = model.module  # averaged by share_gradients' hooks instead (DDP's own stay idle without its forward)
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(causal, causal.base_model_prefix)
    kwargs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if inputs.get(k) is not None}
    hidden = backbone(**kwargs, use_cache=False).last_hidden_state[:, :-1]
    target = inputs["labels"][:, 1:]
    mask = target != -100
    loss = head_cross_entropy(causal.get_output_embeddings(), hidden[mask], target[mask], chunk)
    count = num_items_in_batch if num_items_in_batch is not None else mask.sum()
    return loss / torch.as_tensor(count, device=loss.device).clamp(min=1)


def share_gradients(trainer) -> None:
    """Under torch.distributed, make every rank train the same adapter on the global batch: the trainable weights are
    copied from rank 0, and each gradient is averaged over the ranks as soon as its last micro-batch is accumulated.

    DistributedDataParallel cannot do it here: ``answer_loss`` runs the backbone and the LM head itself, not the
    model's forward that DDP's wrapper times its reduction by, and the Trainer does not even wrap a model that its
    initial evaluation prepared first (accelerate's ``_is_accelerate_prepared``): without this each rank trained its
    own copy on its own half of the batch (found by the two-process test, which compares with one process)."""
    import torch
    import torch.distributed as dist

    from finpipe.training.launch import distributed

    if not distributed():
        return
    model = trainer.model
    ranks = dist.get_world_size()

    def average(param) -> None:
        if param.grad is not None and trainer.accelerator.sync_gradients:  # the last micro-batch of a step
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)  # gloo has no AVG
            param.grad.div_(ranks)

    for param in model.parameters():
        if param.requires_grad:
            with torch.no_grad():
                dist.broadcast(param.data, src=0)
            param.register_post_accumulate_grad_hook(average)


def answer_loss_trainer_class(base):
    """``base`` (SFTTrainer) computing its loss, in training and in evaluation, with ``answer_loss``, under the
    mixed-precision autocast of the run (bf16/fp16): ``answer_loss`` calls the backbone, not the model's forward that
    accelerate wrapped in autocast, and without it the adapter's fp32 weights pulled every adapted layer's
    activations up to fp32 and back (a cast of each input and output, forward and backward)."""

    class AnswerLossSFTTrainer(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with self.accelerator.autocast():
                loss = answer_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as TRL: DDP averages, the count is global
            return (loss, {"loss": loss}) if return_outputs else loss

    return AnswerLossSFTTrainer


def load_base(base_dir: str | Path, quantization: str, plan: DevicePlan):
    """The base model, 4-bit NF4 (double quantization) or unquantized, on the planned device, frozen weights
    directly in the compute dtype (no per-forward re-cast of fp32 weights under autocast)."""
    import torch

    from finpipe.models.quantized import load_quantized_causal_lm
    from finpipe.models.safe_loading import load_causal_lm
    from finpipe.training import attention

    dtype = getattr(torch, plan.compute_dtype)
    device = plan.device
    if plan.attention == attention.NAME:
        attention.register()
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # one process per GPU (accelerate launch, torchrun) or
        device = f"cuda:{os.environ['LOCAL_RANK']}"        # ranks sharing GPUs (launch.share_gpus_if_outnumbered)
    placement = {"device_map": {"": device}, "attn_implementation": plan.attention}
    if quantization == "nf4":
        return load_quantized_causal_lm(base_dir, 4, dtype, **placement)
    return load_causal_lm(base_dir, dtype=dtype, **placement)  # safetensors only, no remote code


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


@dataclass
class _Data:
    train: list[Sample]
    val: list[Sample]
    curve: list[Sample]
    max_seq_len: int
    longest_prompt: int


#: generous training throughput per device (real tokens/s, several times what finpipe measures) used only to cap the
#: samples a time budget can reach, so a short run does not tokenize a whole decade of samples it will never see
ASSUMED_TOKENS_PER_S = {"cpu_per_core": 400, "cuda": 100_000}
MEAN_SAMPLE_TOKENS = 150  # below the real mean (~224 with SmolLM2's template): errs towards more samples
CURVE_MAX_NEW_TOKENS = 96  # as the evaluation: the longest reference answer is ~82 tokens
#: batches' worth of samples a step-limited run keeps at least: transformers' LengthGroupedSampler sorts shuffled
#: mega-batches of up to 50 batches by length, so consecutive samples differ by a token or two
LENGTH_GROUPING_BATCHES = 64


def reachable_samples(spec: AdapterSpec, device: str) -> int | None:
    """How many training samples the budget can possibly consume (None: no cap), and for batches grouped by length at
    least ``LENGTH_GROUPING_BATCHES`` batches' worth: the sampler pairs samples of similar length within a shuffled
    pool, and a run of 6 steps capped at its 12 samples paired them at random (9.4% padding instead of 0.2%)."""
    from finpipe.training.launch import world_size

    caps = []
    ranks = world_size()  # each optimizer step takes batch_size samples on every rank
    if spec.max_steps > 0:
        grouped = spec.group_by_length and not spec.packing
        caps.append(max(spec.max_steps, LENGTH_GROUPING_BATCHES if grouped else 0) * spec.batch_size * spec.grad_accum
                    * ranks)
    if spec.max_minutes > 0:
        rate = ASSUMED_TOKENS_PER_S["cuda"] * ranks if device == "cuda" else \
            ASSUMED_TOKENS_PER_S["cpu_per_core"] * (os.cpu_count() or 1)  # CPU ranks share the same cores
        caps.append(int(spec.max_minutes * 60 * rate / MEAN_SAMPLE_TOKENS) + 1)
    return min(caps) if caps else None


def prepare_data(spec: AdapterSpec, tokenizer, train: Sequence[Sample], val: Sequence[Sample], device: str,
                 replay: Sequence[Sample] = ()) -> _Data:
    """The training set (label-balanced, shuffled, capped at what the budget can reach, with its share of general
    replay samples), the validation subset, the learning-curve questions, and the sequence length (fitted to the
    longest training sample unless set)."""
    import random

    from finpipe.evaluation.golden import pick_per_family

    train = balance_by_label(train, spec.seed) if spec.balance_labels else list(train)
    order = random.Random(f"{spec.seed}|order")
    order.shuffle(train)  # the cap below keeps every family and label
    cap = min(c for c in (spec.max_train_samples or None, reachable_samples(spec, device), len(train)) if c)
    train = train[:cap]
    if replay and spec.general_replay_share > 0:
        wanted = round(len(train) * spec.general_replay_share / (1 - spec.general_replay_share))
        train = train + [replay[i % len(replay)] for i in range(wanted)]
        order.shuffle(train)
    val = list(val)
    curve = pick_per_family([s for s in val if s.facts], spec.curve_answers_per_family, spec.seed + 1) \
        if spec.curve_answers_per_family else []
    if spec.max_val_samples:
        val = val[: spec.max_val_samples]
    if not train or not val:
        raise ValueError(f"need training and validation samples, got {len(train)} and {len(val)}")
    max_seq_len, longest_prompt = fit_sequence_length(spec, tokenizer, [s.messages for s in (*train, *val)])
    return _Data(train, val, curve, max_seq_len, longest_prompt)


def attach_adapter(model, spec: AdapterSpec, plan: DevicePlan, init_adapter, log):
    """(model, peft_config or None, method): a fresh adapter config for TRL to attach, or a warm start's weights."""
    from peft import prepare_model_for_kbit_training

    from finpipe.models.safe_loading import load_peft_adapter
    from finpipe.training import peft_methods

    if plan.quantization == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.gradient_checkpointing)
    if init_adapter is None:
        return model, peft_methods.build_peft_config(spec, model), spec.method
    log(f"warm start from {init_adapter}")
    model = load_peft_adapter(model, init_adapter, is_trainable=True)
    method = peft_methods.method_of(model.peft_config["default"])
    if method != spec.method:
        log(f"warm start: the adapter is {method}, not {spec.method}: training it as {method}")
    return model, None, method


def sft_config(spec: AdapterSpec, plan: DevicePlan, job_dir: Path, max_seq_len: int):
    from trl import SFTConfig

    never = 10**9  # evaluations and checkpoints come from the budget's progress marks, not a step interval
    # transformers 5.x renamed gradient checkpointing to activation checkpointing (the old names warn)
    renamed = "activation_checkpointing" in {f.name for f in dataclasses.fields(SFTConfig)}
    checkpointing = "activation_checkpointing" if renamed else "gradient_checkpointing"
    return SFTConfig(
        output_dir=str(job_dir),
        max_steps=spec.max_steps or -1,
        num_train_epochs=spec.max_epochs if spec.max_epochs > 0 else 1000.0,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum,
        learning_rate=spec.learning_rate,
        eval_strategy="steps", eval_steps=never, save_strategy="steps", save_steps=never, save_total_limit=2,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
        logging_steps=spec.logging_steps,
        report_to=[],  # TensorBoard through an explicit callback (see train_adapter)
        max_length=max_seq_len,
        packing=spec.packing,
        train_sampling_strategy="group_by_length" if spec.group_by_length and not spec.packing else "random",
        assistant_only_loss=True,  # TRL then projects only the answer positions through the vocabulary
        **{checkpointing: plan.gradient_checkpointing,
           f"{checkpointing}_kwargs": {"use_reentrant": False}},  # DDP: reentrant checkpointing marks LoRA twice
        ddp_find_unused_parameters=False,  # every adapter weight gets a gradient: no graph walk per step
        ddp_backend="gloo" if plan.device == "cuda" and gpus_outnumbered() else None,  # else NCCL (GPU) or gloo (CPU)
        bf16=plan.bf16, fp16=plan.fp16, use_cpu=plan.device == "cpu", optim=plan.optimizer,
        include_num_input_tokens_seen="non_padding",
        prediction_loss_only=True,  # evaluation needs the loss; answer_loss computes no logits to return
        seed=spec.seed, data_seed=spec.seed, dataloader_num_workers=0, disable_tqdm=True, dataset_num_proc=None,
    )


@contextlib.contextmanager
def _main_rank_first():
    """Under a distributed launch, the main rank runs the block before the others (accelerate's own barrier);
    alone, just the block."""
    from finpipe.training.launch import world_size

    if world_size() == 1:
        yield
        return
    from accelerate import PartialState

    with PartialState().main_process_first():
        yield


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
    init_tokens: int = 0,
    replay_cache: Path | None = None,
    schedule: ScheduleReplay | None = None,
) -> TrainReport:
    """Train and save an adapter. ``init_adapter``: continue from an existing adapter's weights (warm start,
    e.g. the champion: the nightly run refines yesterday's adapter on the new data); its method and shape win;
    ``init_tokens``: the tokens it was trained on, so the learning curve counts cumulatively. The general replay set
    (``spec.general_replay_share``) is the base's own answers, cached in ``replay_cache`` (default: beside job_dir).
    ``spec.method`` picks the PEFT method (``finpipe.training.peft_methods.build_peft_config``). ``schedule``: a
    recorded run's steps, learning rates and evaluations, replayed instead of the budget's clock (``reproduce``)."""
    from transformers import AutoConfig

    from finpipe.models.safe_loading import load_tokenizer
    from finpipe.runtime import accelerator, claim_cpu_share, quiet_library_deprecations
    from finpipe.training import peft_methods

    # 1. data, sized to the budget

    quiet_library_deprecations()
    cap_matmul_caches()  # before the first matmul (the replay's generation, the bf16 probe): RSS stays flat
    claim_cpu_share()  # this process's share of the cores, re-checked at every step
    share_gpus_if_outnumbered(log)

    tokenizer = load_tokenizer(base_dir)
    replay = []
    if spec.general_replay_share > 0:
        from finpipe.training.replay import general_replay

        with _main_rank_first():  # under torchrun: rank 0 generates and caches it, the other ranks read the cache
            replay = general_replay(base_dir, replay_cache or Path(job_dir).parent / "general_replay", log=log)
    data = prepare_data(spec, tokenizer, train, val, accelerator(), replay)

    # 2. device plan (precision, LoRA or QLoRA, checkpointing) for this machine
    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=False)
    plan = plan_device(spec.quantization, spec.gradient_checkpointing, config, spec.batch_size * data.max_seq_len,
                       data.max_seq_len)
    log(f"training on {plan.note}; up to {len(data.train)} samples (label-balanced: {spec.balance_labels}), "
        f"max_seq_len {data.max_seq_len}")

    # 3. base model and adapter
    model = load_base(base_dir, plan.quantization, plan)
    total_params = count_parameters(model)
    model, peft_config, method = attach_adapter(model, spec, plan, init_adapter, log)
    method_callbacks = peft_methods.prepare_training(method, model if init_adapter is not None else None, log=log)

    # 4. the trainer: TRL's SFTTrainer with the budget's schedule, evaluations and stop
    job_dir.mkdir(parents=True, exist_ok=True)
    run = build_trainer(spec, plan, data, model, peft_config, method, method_callbacks, tokenizer, job_dir,
                        init_tokens, callbacks, log, schedule)
    trainer = run.trainer
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    share_gradients(trainer)

    # 5. train (resuming the newest complete checkpoint of this job, if any)
    resume = last_complete_checkpoint(job_dir, log)
    initial_eval = None
    if resume is None:
        from finpipe.runtime import heartbeat

        with heartbeat(log, "initial evaluation (validation loss, the learning curve's first answers)"):
            initial_eval = trainer.evaluate()["eval_loss"]  # 16-20 s on 2 cores, with no line of its own
        log(f"initial eval loss {initial_eval:.4f}")
    else:
        log(f"resuming from {resume}")
    started = time.perf_counter()
    with RssPeak() as rss:
        trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    # load_best_model_at_end restored the best evaluated checkpoint: its loss is the adapter's
    final_eval = trainer.state.best_metric if trainer.state.best_metric is not None else initial_eval
    if run.tensorboard.tb_writer is not None:
        run.tensorboard.tb_writer.close()

    # 6. report and atomic save
    history = trainer.state.log_history
    train_losses = [(h["step"], round(h["loss"], 4)) for h in history if "loss" in h]
    eval_losses = [(h["step"], round(h["eval_loss"], 4)) for h in history if "eval_loss" in h]
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    if initial_eval is not None:  # train() starts a fresh log history: keep the step-0 evaluation in the curve
        eval_losses.insert(0, (0, round(initial_eval, 4)))
    method_facts = peft_methods.prepare_final_save(trainer.model, method, method_callbacks)
    report = TrainReport(
        adapter_dir=str(adapter_dir), base_model=str(base_dir), quantization=plan.quantization,
        device=plan.device, precision=plan.compute_dtype, device_note=plan.note, trainable_params=trainable,
        total_params=total_params, steps=trainer.state.global_step, resumed_from=resume,
        stopped_early=run.budget.stopped_by is None,
        best_eval_loss=round(final_eval, 4) if final_eval is not None else None,
        initial_eval_loss=None if initial_eval is None else round(initial_eval, 4),
        train_losses=train_losses, eval_losses=eval_losses, train_tokens=tokens,
        tokens_per_s=round(tokens / seconds, 1) if tokens and seconds else 0.0,
        seconds=round(seconds, 1), peak_memory_mb=round(_peak_memory_mb(plan), 1),
        adapter_bytes=0, longest_prompt_tokens=data.longest_prompt,
        warm_start=str(init_adapter) if init_adapter is not None else None, spec=asdict(spec), method=method,
        peak_rss_delta_mb=round(rss.delta_mb, 1), method_facts=method_facts, device_plan=plan.as_dict(),
        max_seq_len=data.max_seq_len, stopped_by=run.budget.stopped_by, curve=run.curve.points,
        cumulative_train_tokens=init_tokens + tokens, train_samples=len(data.train),
        processes=trainer.args.world_size, lr_factors=list(run.budget.lr_given),
    )
    save_adapter(trainer, tokenizer, report, job_dir, adapter_dir)
    return report


@dataclass
class _TrainerRun:
    trainer: Any
    tensorboard: Any  # transformers' TensorBoardCallback, with finpipe's own writer
    budget: Any  # finpipe.training.budget's callback: the schedule, the evaluations, the stop
    curve: Any  # finpipe.training.curve's callback: the strict learning curve


def build_trainer(spec: AdapterSpec, plan: DevicePlan, data: _Data, model, peft_config, method: str,
                  method_callbacks: list, tokenizer, job_dir: Path, init_tokens: int, callbacks: Sequence,
                  log, schedule: ScheduleReplay | None = None) -> _TrainerRun:
    """TRL's SFTTrainer with finpipe's answer-only loss, the method's trainer class, the time budget's schedule
    and stop, the strict learning curve, early stopping and TensorBoard logs in the job folder."""
    import datasets
    from torch.utils.tensorboard import SummaryWriter
    from transformers import EarlyStoppingCallback
    from transformers.integrations import TensorBoardCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    from finpipe.training import peft_methods
    from finpipe.training.budget import budget_callback_class, budgeted_trainer_class
    from finpipe.training.curve import curve_callback_class

    config = sft_config(spec, plan, job_dir, data.max_seq_len)
    # An explicit writer: transformers' own TensorBoard callback opens its writer at the first log call, and
    # the initial evaluate() logs before train() sets its directory, so it wrote into ./runs (cwd).
    # With several processes (accelerate launch, torchrun) only the first one logs and writes the adapter.
    main_process = config.process_index == 0
    tensorboard = TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(job_dir / "runs")) if main_process else None)
    budget = budget_callback_class()(spec.max_minutes, spec.max_steps, spec.max_epochs, spec.eval_points,
                                     spec.warmup_ratio, job_dir, spec.lr_schedule, log=log, replay=schedule)
    curve = curve_callback_class()(tokenizer, data.curve, CURVE_MAX_NEW_TOKENS, job_dir, init_tokens, log)
    to_ds = lambda samples: datasets.Dataset.from_list([{"messages": s.messages} for s in samples])  # noqa: E731
    trainer = budgeted_trainer_class(peft_methods.trainer_class(method, answer_loss_trainer_class(SFTTrainer)))(
        model=model, args=config, train_dataset=to_ds(data.train), eval_dataset=to_ds(data.val),
        processing_class=tokenizer, peft_config=peft_config,
        callbacks=[tensorboard, budget, curve,
                   *([EarlyStoppingCallback(spec.early_stopping_patience)] if spec.early_stopping_patience else []),
                   *method_callbacks, *callbacks],
    )
    trainer.budget = budget
    trainer.remove_callback(PrinterCallback)  # raw dicts on stdout: the budget's progress lines say it in words
    if plan.quantization == "nf4":
        peft_methods.restore_fp32(trainer.model, replace(spec, method=method))  # after TRL's bf16 cast
    if plan.bf16 or plan.fp16:  # every forward runs under autocast (the loss, evaluations, the curve's answers)
        peft_methods.keep_input_dtype(trainer.model)
    return _TrainerRun(trainer, tensorboard, budget, curve)


def save_adapter(trainer, tokenizer, report: TrainReport, job_dir: Path, adapter_dir: Path) -> None:
    """The adapter, its tokenizer, TensorBoard logs and training report, written into ``adapter_dir`` all at once
    (a temporary folder renamed into place: an interrupted save leaves the previous adapter whole)."""
    if trainer.args.process_index == 0:
        with atomic_dir(adapter_dir) as tmp:
            trainer.model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            if (job_dir / "runs").exists():
                shutil.copytree(job_dir / "runs", tmp / "tensorboard")
            report.adapter_bytes = folder_size(tmp)
            (tmp / "training_report.json").write_text(json.dumps(asdict(report), indent=2))
    trainer.accelerator.wait_for_everyone()
    report.adapter_bytes = folder_size(adapter_dir)


def load_adapter(base_dir: str | Path, adapter_dir: str | Path, quantization: str = "none"):
    """The plain PEFT way: base model + ``PeftModel.from_pretrained(base, adapter_dir)``."""
    from finpipe.models.safe_loading import load_peft_adapter

    plan = plan_device(quantization)
    base = load_base(base_dir, plan.quantization, plan)
    return load_peft_adapter(base, adapter_dir)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
