"""Which compression, at what cost: compressed variants of one plain causal-LM folder, each measured the same way.

Variants
- ``fp32`` / ``bf16``: the unquantized references (bf16 halves the bytes; on this CPU it has native bf16 matmuls).
- ``int8``: bitsandbytes LLM.int8() (``BitsAndBytesConfig(load_in_8bit=True)``), post-training, no calibration.
- ``nf4``: bitsandbytes 4-bit NF4 with double quantization, fp32 compute.
- ``dropK``: the K least important decoder layers removed (ShortGPT "block influence"), chosen successively:
  for increasing K the ranking is recomputed on the current (already dropped, optionally healed) model.
- ``dropK+heal``: the same, after a short LoRA pass merged back into the weights ("successive adaptation and
  compression": each drop starts from the healed previous model).

Every variant is scored by ``finpipe.evaluation.evaluate.score_set`` (loss, answer metrics, latency, tokens/s)
and also gets size, parameter count, layer count and the peak RSS growth while it is scored. Rows are marked
with Pareto flags for size vs quality and speed vs quality (``finpipe.studies.pareto``).

What runs on a CPU-only machine (measured with torch 2.13.0+cpu, transformers 5.24.0, bitsandbytes 0.48.2):
see ``INT8_CPU_NOTE``, ``NF4_CPU_NOTE`` and ``UNSUPPORTED_METHODS``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from finpipe.evaluation.evaluate import ANSWER_METRICS, quality_score, score_set
from finpipe.evaluation.generation import Sampling, generate
from finpipe.instructions.samples import Sample
from finpipe.models.files import atomic_dir
from finpipe.runtime import accelerator, inference_dtype, package_versions, release_memory
from finpipe.settings import non_finite, setting
from finpipe.studies.pareto import pareto_front, pareto_plot_png
from finpipe.training.memory import RssPeak

Log = Callable[[str], None]

#: what the study found of each bitsandbytes variant on a CPU (docs/studies.md: how it was checked)
INT8_CPU_NOTE = ("works on CPU with bitsandbytes 0.48.2 + transformers 5.x: Linear8bitLt via torch._int_mm; "
                 "activations are cast to fp16 for quantization")

NF4_CPU_NOTE = "works on CPU: Linear4bit, fp32 compute; saves memory, not time"

#: why GPTQ and AWQ are not studied (docs/studies.md: checked against the package registry)
UNSUPPORTED_METHODS: dict[str, str] = {
    "gptq": (
        "no installable CPU path for this stack: transformers 5.x runs GPTQ only through gptqmodel (+ optimum); "
        "gptqmodel 7.7.0, the maintained one, is a source-only release that compiles C++ extensions and requires "
        "torch>=2.14.1 (finpipe pins 2.13.0), pyarrow>=26 and torchao (older sdists, e.g. 6.0.3, need 'pcre' "
        "just to build their metadata); auto-gptq 0.7.1 (last release, 2024-03, unmaintained) ships only CUDA "
        "kernels built for torch 2.2 and transformers 5 no longer loads it; llmcompressor 0.14.0.1 pins "
        "transformers<=5.17.0 and torch<=2.14.0 and produces compressed-tensors checkpoints meant for vLLM on GPUs"
    ),
    "awq": (
        "no installable CPU path for this stack: autoawq 0.2.9 is officially deprecated (adopted by vLLM's "
        "llm-compressor), is source-only and needs triton and CUDA kernels; transformers 5.x loads AWQ "
        "checkpoints only through gptqmodel (blocked as for gptq); llmcompressor's AWQ pins transformers<=5.17.0"
    ),
}

PTQ_VARIANTS = ("fp32", "bf16", "int8", "nf4")

#: every row of ``run_compression_study`` has these keys (None where a value does not apply or was skipped)
ROW_KEYS = (
    "variant", "method", "dtype", "skipped", "note", "folder", "source",
    "size_bytes", "size_mb", "size_basis", "memory_mb", "parameters", "layers", "dropped_layers",
    "layer_importance", "healed", "heal_steps", "heal_eval_loss",
    "tokens_per_s", "latency_s", "peak_rss_increase_mb", "loss", "perplexity", *ANSWER_METRICS, "quality",
    "seconds", "pareto_size", "pareto_speed",
)

SIZE_DISK = "disk: safetensors weight files of the saved variant folder"
SIZE_MEMORY = "memory: parameter + buffer + quantization-state bytes of the loaded model (not serialized)"


@dataclass(frozen=True)
class CompressionSpec:
    """Knobs of one study, validated up front (``ks`` against the model's depth at run time)."""

    ks: tuple[int, ...] = setting((2, 4), "decoder layers to drop in total, successively (each a running total)")
    heal_steps: int = setting(8, "LoRA steps after each drop (0 = no healing)")
    answers: int = setting(14, "golden answers generated per variant (spread over the families)")
    max_new_tokens: int = setting(64, "longest generated answer")
    calibration_prompts: int = setting(16, "training conversations used to rank layers")
    seed: int = setting(0, "seed")
    bf16: bool = setting(True, "measure the bf16 variant")
    int8: bool = setting(True, "measure the bitsandbytes 8-bit variant")
    nf4: bool = setting(True, "measure the bitsandbytes 4-bit NF4 variant")
    heal_lora_r: int = setting(8, "rank of the healing LoRA")
    heal_learning_rate: float = setting(5e-4, "learning rate of the healing LoRA")
    heal_batch_size: int = setting(2, "batch of the healing LoRA")
    heal_max_seq_len: int = setting(512, "sequence length of the healing LoRA")
    heal_max_train_samples: int = setting(0, "healing samples (0 = all)")
    heal_val_samples: int = setting(8, "validation samples during healing")

    def __post_init__(self) -> None:
        problems = non_finite(self)
        ks = list(self.ks) if isinstance(self.ks, (list, tuple)) else None
        if not ks:
            problems.append(f"ks must list at least one number of layers to drop, got {self.ks!r}")
        elif any(not isinstance(k, int) or isinstance(k, bool) or k <= 0 for k in ks):
            problems.append(f"every k in ks must be an integer > 0, got {list(self.ks)}")
        else:
            # sorted and de-duplicated: drops are successive, each k is a running total
            object.__setattr__(self, "ks", tuple(sorted(set(ks))))
        if not isinstance(self.heal_steps, int) or self.heal_steps < 0:
            problems.append(f"heal_steps must be an integer >= 0, got {self.heal_steps!r}")
        for name in ("answers", "max_new_tokens", "calibration_prompts", "heal_lora_r", "heal_batch_size",
                     "heal_max_seq_len", "heal_val_samples"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.heal_max_train_samples < 0:
            problems.append(f"heal_max_train_samples must be >= 0, got {self.heal_max_train_samples}")
        if self.heal_learning_rate <= 0:
            problems.append(f"heal_learning_rate must be > 0, got {self.heal_learning_rate}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            problems.append(f"seed must be an integer >= 0, got {self.seed!r}")
        if problems:
            raise ValueError("invalid compression study config: " + "; ".join(problems))


def check_ks(ks: Sequence[int], num_layers: int) -> None:
    """Every k must leave at least one decoder layer."""
    too_many = [k for k in ks if k >= num_layers]
    if too_many:
        raise ValueError(f"cannot drop {too_many[0]} of the model's {num_layers} decoder layers: every k must be "
                         f"< {num_layers} (at least one layer must remain), got ks={list(ks)}")


# ---------------------------------------------------------------------------------------------- layers

def decoder_layers(model) -> Any:
    """The ``nn.ModuleList`` of decoder blocks of a Llama-style model (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no model.model.layers: only Llama-style decoders are supported")
    return layers


def layer_importance(model, tokenizer, prompts: list[list[dict]]) -> list[float]:
    """Per decoder layer, 1 - mean cosine similarity between its input and output hidden states (ShortGPT's
    block influence), averaged over every token of the templated ``prompts``. Low = the layer barely changes
    the residual stream = the cheapest to drop."""
    import torch
    import torch.nn.functional as F

    if not prompts:
        raise ValueError("layer_importance needs at least one prompt")
    layers = decoder_layers(model)
    n = len(layers)
    # transformers returns the *final-norm* output as hidden_states[-1], not the last layer's raw output: the
    # norm's learned scale would distort that layer's cosine, so capture the raw output with a hook instead
    captured: dict[str, Any] = {}

    def keep_output(_module, _args, output) -> None:
        captured["last"] = output[0] if isinstance(output, tuple) else output

    similarity = torch.zeros(n, dtype=torch.float64)
    tokens = 0
    hook = layers[-1].register_forward_hook(keep_output)
    try:
        with torch.inference_mode():
            for messages in prompts:
                open_turn = not messages or messages[-1].get("role") != "assistant"
                enc = tokenizer.apply_chat_template(messages, add_generation_prompt=open_turn, return_tensors="pt",
                                                    return_dict=True)
                enc = {k: v.to(model.device) for k, v in enc.items()}
                out = model(**enc, output_hidden_states=True, use_cache=False)
                states = list(out.hidden_states)
                if len(states) != n + 1:
                    raise RuntimeError(f"expected {n + 1} hidden states, got {len(states)}")
                states[-1] = captured["last"]
                for i in range(n):  # hidden_states[i] is layer i's input, [i + 1] its output
                    cos = F.cosine_similarity(states[i][0].float(), states[i + 1][0].float(), dim=-1)
                    similarity[i] += cos.double().sum()
                tokens += int(states[0].shape[1])
    finally:
        hook.remove()
    return [float(1.0 - s / tokens) for s in similarity]


def least_important(scores: Sequence[float], n: int) -> list[int]:
    """Indices of the ``n`` lowest scores (ties: the earlier layer), ascending."""
    return sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:n])


def drop_layers(model, indices: Sequence[int]):
    """Remove decoder layers in place (and return the model): the module list, ``config.num_hidden_layers``,
    ``config.layer_types`` and every ``layer_idx`` (the KV cache is indexed by it) are made consistent, so the
    result saves and reloads with plain ``AutoModelForCausalLM.from_pretrained``."""
    import torch

    layers = decoder_layers(model)
    n = len(layers)
    drop = list(indices)
    if any(not isinstance(i, int) or isinstance(i, bool) for i in drop):
        raise ValueError(f"layer indices must be integers, got {drop}")
    if len(set(drop)) != len(drop):
        raise ValueError(f"duplicate layer indices: {drop}")
    if any(not 0 <= i < n for i in drop):
        raise ValueError(f"layer indices must be in [0, {n}), got {drop}")
    if len(drop) >= n:
        raise ValueError(f"cannot drop {len(drop)} of {n} layers: at least one must remain")
    keep = [i for i in range(n) if i not in set(drop)]
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):
        for module in layer.modules():  # attention (and any other per-layer cache user) addresses the cache by it
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    config = model.config
    config.num_hidden_layers = len(keep)  # the forward loop and the cache are sized from it
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    return model


# ------------------------------------------------------------------------------------------- variants

def load_variant(model_dir: str | Path, kind: str, device: str | None = None):
    """One post-training variant of a plain model folder: ``fp32``, ``bf16``, ``int8`` or ``nf4``."""
    import torch

    from finpipe.models.quantized import load_quantized_causal_lm
    from finpipe.models.safe_loading import load_causal_lm

    if kind not in PTQ_VARIANTS:
        raise ValueError(f"unknown variant {kind!r}: expected one of {PTQ_VARIANTS}")
    placement = {"device_map": {"": device or accelerator()}}
    if kind in ("int8", "nf4"):
        # fp32 compute isolates the effect of the quantized weights from any compute-precision effect
        model = load_quantized_causal_lm(model_dir, 4 if kind == "nf4" else 8, torch.float32, **placement)
    else:
        model = load_causal_lm(model_dir, dtype=torch.bfloat16 if kind == "bf16" else torch.float32, **placement)
    model.eval()
    return model


def _bnb_kind(model) -> str | None:
    for module in model.modules():
        name = type(module).__name__
        if name == "Linear4bit":
            return f"4bit-{getattr(module.weight, 'quant_type', 'nf4')}"
        if name == "Linear8bitLt":
            return "int8"
    return None


def in_memory_bytes(model) -> int:
    """Bytes held by parameters, buffers and bitsandbytes quantization state (absmax, codebooks, row scales);
    shared storages (tied weights, CB aliasing the weight) counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if t is None or not hasattr(t, "untyped_storage"):
            return
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()

    for p in model.parameters():
        add(p)
        add(getattr(p, "SCB", None))  # Int8Params: one fp32 scale per output row
        state = getattr(p, "quant_state", None)  # Params4bit: block absmax (+ nested state) and the codebook
        while state is not None:
            for name in ("absmax", "code", "offset"):
                add(getattr(state, name, None))
            state = getattr(state, "state2", None)
    for b in model.buffers():
        add(b)
    return total


def _dtype_name(model) -> str:
    kind = _bnb_kind(model)
    if kind:
        return kind
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def save_plain(model, tokenizer, folder: str | Path) -> Path:
    """Save a plain (unquantized) model and its tokenizer atomically, world-readable like an export."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for weights in tmp.glob("*.safetensors"):
            weights.chmod(0o644)
    return folder


def measure_variant(name: str, model, tokenizer, samples: Sequence[Sample], sampling: Sampling,
                    folder: str | Path | None = None, loss_samples: Sequence[Sample] | None = None,
                    save: bool = True, log: Log = lambda _: None) -> dict:
    """Size, parameters, layers, speed, memory growth and answer quality of one loaded variant.

    Size: a plain model with ``folder`` is saved there (unless ``save=False``: the folder already holds it) and
    its safetensors bytes are the size; a bitsandbytes model, or no folder, reports in-memory bytes
    (``size_basis`` says which). Quality, latency and tokens/s come from ``score_set`` on ``samples`` (loss on
    ``loss_samples``, default the same samples). The per-answer rows are returned under ``answers``.
    """
    from finpipe.training.sft import count_parameters

    if not samples:
        raise ValueError("measure_variant needs at least one answer sample")
    quantized = _bnb_kind(model) is not None
    memory = in_memory_bytes(model)
    if folder is not None and not quantized:
        folder = Path(folder)
        if save:
            save_plain(model, tokenizer, folder)
        size, basis = _weights_bytes(folder), SIZE_DISK
    else:
        size, basis = memory, SIZE_MEMORY
    release_memory()
    started = time.perf_counter()
    with RssPeak() as rss:  # only inference: saving allocates serialization buffers unrelated to serving
        # an untimed warm-up answer: the first generate pays one-time costs (kernel selection, lazy allocations)
        # that would otherwise land on whichever variant is measured first
        warm_up = Sampling(max_new_tokens=min(4, sampling.max_new_tokens))
        generate(model, tokenizer, samples[0].messages[:-1], warm_up)
        scores = score_set(model, tokenizer, list(loss_samples if loss_samples is not None else samples),
                           list(samples), sampling, log)
    seconds = time.perf_counter() - started
    metrics = dict(scores.overall)
    saved_to = str(folder) if folder is not None and not quantized else None
    return {
        "variant": name, "dtype": _dtype_name(model), "folder": saved_to, "size_bytes": size,
        "size_mb": round(size / 2**20, 4), "size_basis": basis,
        "memory_mb": round(memory / 2**20, 4), "parameters": count_parameters(model),
        "layers": len(decoder_layers(model)), "tokens_per_s": scores.tokens_per_s, "latency_s": scores.latency_s,
        "peak_rss_increase_mb": round(rss.delta_mb, 2), "loss": scores.loss, "perplexity": round(scores.perplexity, 4),
        **{k: metrics.get(k) for k in ANSWER_METRICS}, "quality": quality_score(metrics),
        "seconds": round(seconds, 2), "answers": scores.rows,
    }


# -------------------------------------------------------------------------------------------- healing

@dataclass
class HealReport:
    folder: str
    adapter_dir: str
    steps: int
    initial_eval_loss: float | None
    best_eval_loss: float | None
    seconds: float
    extra: dict = field(default_factory=dict)


def heal_with_lora(model_dir: str | Path, train_samples: Sequence[Sample], val_samples: Sequence[Sample],
                   out_dir: str | Path, steps: int, lora_r: int = 8, learning_rate: float = 5e-4,
                   batch_size: int = 2, max_seq_len: int = 512, max_train_samples: int = 0,
                   max_val_samples: int = 8, seed: int = 0, log: Log = print) -> HealReport:
    """A short LoRA pass on ``model_dir`` (``train_adapter``), merged into the weights (``export_merged``:
    peft ``merge_and_unload`` in fp32, saved in the checkpoint's dtype) and written to ``out_dir`` as a plain
    model folder. The adapter is kept next to it (``<out_dir>.heal/adapter``); the Trainer checkpoints are not."""
    import torch

    from finpipe.inference.export import export_merged
    from finpipe.training.sft import train_adapter
    from finpipe.training.spec import AdapterSpec

    if steps <= 0:
        raise ValueError(f"heal steps must be > 0, got {steps}")
    out_dir = Path(out_dir)
    work = out_dir.with_name(f"{out_dir.name}.heal")
    job_dir, adapter_dir = work / "job", work / "adapter"
    # a previous run's checkpoints belong to another model: train_adapter would resume from them
    shutil.rmtree(job_dir, ignore_errors=True)
    spec = AdapterSpec(
        quantization="none", lora_r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, learning_rate=learning_rate,
        max_minutes=0, max_steps=steps, batch_size=batch_size, max_seq_len=max_seq_len, warmup_ratio=0.0,
        eval_points=1, early_stopping_patience=0, gradient_checkpointing="off", balance_labels=False,
        curve_answers_per_family=0, general_replay_share=0.0,  # short run: speed over memory
        max_train_samples=max_train_samples, max_val_samples=max_val_samples, logging_steps=max(1, steps // 4),
        seed=seed)
    torch.manual_seed(seed)
    report = train_adapter(model_dir, train_samples, val_samples, job_dir, adapter_dir, spec, log=log)
    shutil.rmtree(job_dir, ignore_errors=True)  # optimizer state and checkpoints: not needed after the merge
    export_merged(model_dir, adapter_dir, out_dir, force=True,
                  provenance={"study": "compression", "healed_from": str(model_dir), "heal_steps": steps})
    return HealReport(folder=str(out_dir), adapter_dir=str(adapter_dir), steps=report.steps,
                      initial_eval_loss=report.initial_eval_loss, best_eval_loss=report.best_eval_loss,
                      seconds=report.seconds, extra={"train_tokens": report.train_tokens})


# --------------------------------------------------------------------------------------------- studies

def spread(samples: Sequence[Sample], n: int, seed: int) -> list[Sample]:
    """Up to ``n`` samples taken round-robin over the families, each family shuffled by ``seed``."""
    by_family: dict[str, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: s.id):
        by_family.setdefault(s.family, []).append(s)
    queues = []
    for family in sorted(by_family):
        group = by_family[family]
        random.Random(f"{seed}|{family}").shuffle(group)
        queues.append(group)
    picked: list[Sample] = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


def num_layers_of(model_dir: str | Path) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if "num_hidden_layers" not in config:
        raise ValueError(f"{model_dir}/config.json has no num_hidden_layers: not a decoder-only causal LM")
    return int(config["num_hidden_layers"])


def _row(**values) -> dict:
    return {k: values.get(k) for k in ROW_KEYS} | {k: v for k, v in values.items() if k not in ROW_KEYS}


def successive_drop_and_heal(model_dir: str | Path, ks: list[int], train: Sequence[Sample], val: Sequence[Sample],
                             answer_samples: Sequence[Sample], out_dir: str | Path, sampling: Sampling,
                             heal_steps: int, calibration_prompts: int = 16, seed: int = 0,
                             heal_options: dict | None = None, log: Log = print) -> list[dict]:
    """For each k (ascending): rank the current model's layers, drop the least important until k are gone in
    total, measure (``drop{k}``); with ``heal_steps`` heal with LoRA and measure again (``drop{k}+heal``). The
    next k starts from the healed model when there is one, so adaptation and compression alternate."""
    import torch

    from finpipe.models.safe_loading import load_causal_lm, load_tokenizer

    ks = sorted(set(ks))
    total_layers = num_layers_of(model_dir)
    check_ks(ks, total_layers)
    if heal_steps and not (train and val):
        raise ValueError("healing needs training and validation samples")
    out_dir = Path(out_dir)
    # rank layers on training conversations (prompt and answer tokens), never on the answers being scored
    prompts = [s.messages for s in spread(train, calibration_prompts, seed)]
    if not prompts:
        raise ValueError("ranking layers needs calibration conversations: train is empty")
    device = accelerator()
    dtype = inference_dtype(device)
    current = Path(model_dir)
    original_ids = list(range(total_layers))  # original index of each layer of the current model
    dropped: list[int] = []
    rows: list[dict] = []
    for k in ks:
        torch.manual_seed(seed)
        model = load_causal_lm(current, dtype=dtype, device_map={"": device})
        model.eval()
        tokenizer = load_tokenizer(current)
        scores = layer_importance(model, tokenizer, prompts)
        victims = least_important(scores, k - len(dropped))
        dropped += [original_ids[i] for i in victims]
        original_ids = [o for i, o in enumerate(original_ids) if i not in set(victims)]
        log(f"drop{k}: importance {[round(s, 4) for s in scores]} -> dropping current layers {victims} "
            f"(original {sorted(dropped)})")
        drop_layers(model, victims)
        name = f"drop{k}"
        folder = out_dir / name
        row = measure_variant(name, model, tokenizer, answer_samples, sampling, folder=folder, log=log)
        rows.append(_row(**row, method="layer_drop", source=str(current), dropped_layers=sorted(dropped),
                         layer_importance=[round(s, 6) for s in scores], healed=False, heal_steps=0))
        del model
        release_memory()
        current = folder
        if heal_steps:
            healed_dir = out_dir / f"{name}_heal"
            log(f"{name}: healing with {heal_steps} LoRA steps")
            opts = heal_options or {}
            heal = heal_with_lora(folder, train, val, healed_dir, heal_steps, seed=seed, log=log, **opts)
            model = load_causal_lm(healed_dir, dtype=dtype, device_map={"": device})
            model.eval()
            tokenizer = load_tokenizer(healed_dir)
            row = measure_variant(f"{name}+heal", model, tokenizer, answer_samples, sampling, folder=healed_dir,
                                  save=False, log=log)
            rows.append(_row(**row, method="layer_drop+lora_heal", source=str(folder), dropped_layers=sorted(dropped),
                             healed=True, heal_steps=heal.steps, heal_eval_loss=heal.best_eval_loss))
            del model
            release_memory()
            current = healed_dir
    return rows


def mark_pareto(rows: list[dict]) -> list[dict]:
    """Set ``pareto_size`` (smaller size_mb, higher quality) and ``pareto_speed`` (higher tokens_per_s, higher
    quality) on the measured rows; skipped rows are never on a frontier.

    ``size_mb`` is safetensors bytes for plain models and in-memory bytes for bitsandbytes ones; for a plain model
    the two differ only by the safetensors header (``memory_mb`` is the same-basis column for every variant).
    """
    measured = [r for r in rows if not r.get("skipped")]
    size = pareto_front(measured, maximize=["quality"], minimize=["size_mb"]) if measured else []
    speed = pareto_front(measured, maximize=["quality", "tokens_per_s"], minimize=[]) if measured else []
    flags = {id(r): (a, b) for r, a, b in zip(measured, size, speed)}
    for r in rows:
        r["pareto_size"], r["pareto_speed"] = flags.get(id(r), (False, False))
    return rows


def run_compression_study(model_dir: str | Path, train: Sequence[Sample], val: Sequence[Sample],
                          answer_samples: Sequence[Sample], out_dir: str | Path, spec: CompressionSpec,
                          log: Log = print) -> list[dict]:
    """All variants of ``model_dir`` (fp32, bf16, int8, nf4, drop{k}[+heal]), measured on the same answers,
    with Pareto flags. Writes ``study.json``, ``answers.jsonl`` and two Pareto plots into ``out_dir``."""
    import torch

    from finpipe.models.safe_loading import load_tokenizer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_ks(spec.ks, num_layers_of(model_dir))  # before any expensive work
    answers = spread(answer_samples, spec.answers, spec.seed)
    if not answers:
        raise ValueError("run_compression_study needs at least one answer sample")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    sampling = Sampling(max_new_tokens=spec.max_new_tokens)
    tokenizer = load_tokenizer(model_dir)
    rows: list[dict] = []
    started = time.perf_counter()
    # timings are only comparable on a quiet machine: with other processes on the cores, OpenMP barriers of a
    # multi-threaded torch can slow small models 10-100x; the load average goes into study.json to judge that
    load_before = _load_average()

    wanted = [k for k in PTQ_VARIANTS if k == "fp32" or getattr(spec, k)]
    for kind in wanted:
        log(f"{kind}: loading and measuring")
        torch.manual_seed(spec.seed)
        try:
            model = load_variant(model_dir, kind)
            folder = out_dir / "variants" / kind if kind in ("fp32", "bf16") else None
            row = measure_variant(kind, model, tokenizer, answers, sampling, folder=folder, log=log)
        except Exception as e:  # noqa: BLE001
            if kind in ("fp32", "bf16"):
                raise  # the references must work: a failure there is a real bug
            # a quantization backend that cannot run here is a finding, not a crash: record exactly why
            reason = f"{type(e).__name__}: {e}".strip()[:500]
            log(f"{kind}: skipped ({reason})")
            rows.append(_row(variant=kind, method="ptq", source=str(model_dir), skipped=reason, healed=False,
                             heal_steps=0))
            continue
        finally:
            model = None
            release_memory()
        note = {"int8": INT8_CPU_NOTE, "nf4": NF4_CPU_NOTE}.get(kind)
        rows.append(_row(**row, method="reference" if kind in ("fp32", "bf16") else "ptq", source=str(model_dir),
                         note=note, healed=False, heal_steps=0))

    heal_options = {"lora_r": spec.heal_lora_r, "learning_rate": spec.heal_learning_rate,
                    "batch_size": spec.heal_batch_size, "max_seq_len": spec.heal_max_seq_len,
                    "max_train_samples": spec.heal_max_train_samples, "max_val_samples": spec.heal_val_samples}
    rows += successive_drop_and_heal(model_dir, list(spec.ks), train, val, answers, out_dir / "variants", sampling,
                                     heal_steps=spec.heal_steps, calibration_prompts=spec.calibration_prompts,
                                     seed=spec.seed, heal_options=heal_options, log=log)
    mark_pareto(rows)

    with open(out_dir / "answers.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            for a in r.pop("answers", None) or []:
                f.write(json.dumps({"variant": r["variant"]} | a, ensure_ascii=False, default=str) + "\n")
    plots = {
        "size": pareto_plot_png(rows, "size_mb", "quality", "variant", out_dir / "pareto_size.png",
                                "Compression: size vs quality", x_lower_is_better=True),
        "speed": pareto_plot_png(rows, "tokens_per_s", "quality", "variant", out_dir / "pareto_speed.png",
                                 "Compression: generation speed vs quality", x_lower_is_better=False),
    }
    summary = {"model_dir": str(model_dir), "spec": asdict(spec), "rows": rows, "unsupported": UNSUPPORTED_METHODS,
               "int8_cpu": INT8_CPU_NOTE, "nf4_cpu": NF4_CPU_NOTE, "plots": {k: str(v) for k, v in plots.items()},
               "answers": [s.id for s in answers], "seconds": round(time.perf_counter() - started, 1),
               "versions": package_versions(), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "load_average": {"before": load_before, "after": _load_average()}}
    (out_dir / "study.json").write_text(json.dumps(summary, indent=2, default=str))
    log(f"compression study: {len(rows)} rows in {summary['seconds']} s -> {out_dir}")
    return rows


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
