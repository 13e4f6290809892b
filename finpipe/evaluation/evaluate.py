"""Score models on held-out chat samples: teacher-forced loss, and greedy answers scored against the
samples' structured fields (numbers, labels) and reference text, per family and overall.

Every model variant is scored the same way on the same samples:
- ``loss``: mean cross-entropy of the reference answer's tokens given the prompt (assistant tokens only),
  and its perplexity ``exp(loss)``;
- answers generated greedily with the KV cache (bounded tokens), scored with ``finpipe.evaluation.metrics``;
- latency of a single answer and its generation tokens/s (batch 1, KV cache); the scored answers themselves
  are generated in batches (several times faster on a CPU, same greedy text up to padding effects).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from finpipe.evaluation import metrics as m
from finpipe.evaluation.generation import Sampling, generate, generate_batch, load_chat_model
from finpipe.evaluation.golden import pick_per_family
from finpipe.instructions.samples import Sample

#: answer metrics averaged per family and overall (None values, e.g. no labels expected, are skipped)
ANSWER_METRICS = ("numeric_fidelity", "label_accuracy", "token_f1", "rouge_l", "format_validity")
#: one number per model for promotion across bases, study plots and Pareto frontiers
QUALITY_METRICS = ("numeric_fidelity", "label_accuracy", "rouge_l")


def quality_score(overall: dict) -> float:
    """Mean of numeric fidelity, label accuracy and ROUGE-L (metrics a set does not define are skipped)."""
    values = [overall.get(k) for k in QUALITY_METRICS]
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else 0.0


@dataclass(frozen=True)
class EvalSpec:
    # sized for 2 CPU cores (a few minutes per evaluation with SmolLM2-135M); raise them on a GPU
    val_answers_per_family: int = 1  # generated answers per family on the validation split
    golden_per_family: int = 2  # size of the frozen golden set, per family (only used when it is created)
    loss_samples: int = 21  # validation samples for the teacher-forced loss (spread over the families)
    max_new_tokens: int = 80
    regression_tolerance: float = 0.05  # allowed drop vs the champion on golden answer metrics
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("val_answers_per_family", "golden_per_family", "loss_samples", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"invalid evaluation config: {name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.regression_tolerance < 1:
            raise ValueError(f"invalid evaluation config: regression_tolerance must be in [0, 1), "
                             f"got {self.regression_tolerance}")


@dataclass
class SetScores:
    """One model on one sample set."""

    loss: float
    overall: dict[str, float | None]
    per_family: dict[str, dict[str, float | None]]
    rows: list[dict] = field(default_factory=list)  # one per generated answer (answer text, metrics, timing)
    latency_s: float = 0.0  # mean seconds per answer
    tokens_per_s: float = 0.0  # generated tokens / generation seconds

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    def as_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "overall": self.overall,
                "per_family": self.per_family, "latency_s": self.latency_s, "tokens_per_s": self.tokens_per_s}


def assistant_loss(model, tokenizer, samples: Sequence[Sample], batch_size: int = 4) -> float:
    """Mean token cross-entropy of each sample's answer given its prompt (system + user turns).

    The answer tokens are those after the templated prompt with its generation prompt; this works for any
    chat template whose prompt is a prefix of the full conversation (no ``{% generation %}`` markers needed).
    """
    import torch

    if not samples:
        raise ValueError("assistant_loss needs at least one sample")
    sequences: list[tuple[list[int], int]] = []
    for s in samples:
        prompt = _ids(tokenizer.apply_chat_template(s.messages[:-1], add_generation_prompt=True, tokenize=True))
        full = _ids(tokenizer.apply_chat_template(s.messages, tokenize=True))
        if full[: len(prompt)] != prompt:
            raise ValueError("the chat template's prompt is not a prefix of the conversation: cannot isolate the answer")
        sequences.append((full, len(prompt)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total_nll, total_tokens = 0.0, 0
    model_device = next(model.parameters()).device
    with torch.inference_mode():
        for i in range(0, len(sequences), batch_size):
            chunk = sequences[i: i + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for row, (ids, start) in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
                labels[row, start: len(ids)] = torch.tensor(ids[start:])
            logits = model(input_ids=input_ids.to(model_device), attention_mask=attention.to(model_device)).logits
            shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:].to(model_device)
            nll = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                                    shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
            total_nll += float(nll)
            total_tokens += int((shift_labels != -100).sum())
    return total_nll / total_tokens


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def loss_subset(samples: Sequence[Sample], n: int, seed: int) -> list[Sample]:
    """About ``n`` samples for the teacher-forced loss, spread evenly over the families (seeded)."""
    families = max(1, len({s.family for s in samples}))
    return pick_per_family(samples, max(1, n // families), seed)


def score_answer(sample: Sample, answer: str) -> dict:
    reference = sample.text_of("assistant")
    return {
        "numeric_fidelity": m.numeric_fidelity(answer, sample.expected),
        "label_accuracy": m.label_accuracy(answer, sample.labels),
        "token_f1": m.token_f1(answer, reference),
        "rouge_l": m.rouge_l(answer, reference),
        "format_validity": float(m.format_valid(answer)),
    }


def summarize(rows: Sequence[dict]) -> tuple[dict[str, float | None], dict[str, dict[str, float | None]]]:
    """(overall, per family) means of ``ANSWER_METRICS``; a metric no row defines is None."""

    def means(group: Sequence[dict]) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name in ANSWER_METRICS:
            values = [r[name] for r in group if r.get(name) is not None]
            out[name] = round(sum(values) / len(values), 4) if values else None
        return out

    families = sorted({r["family"] for r in rows})
    return means(rows), {f: means([r for r in rows if r["family"] == f]) for f in families}


def score_set(model, tokenizer, loss_samples: Sequence[Sample], answer_samples: Sequence[Sample],
              sampling: Sampling, log: Callable[[str], None] = lambda _: None, batch_size: int = 8) -> SetScores:
    loss = assistant_loss(model, tokenizer, loss_samples)
    generated = generate_batch(model, tokenizer, [s.messages[:-1] for s in answer_samples], sampling, batch_size)
    rows = [{"id": s.id, "family": s.family, "tickers": ",".join(s.tickers), "as_of": s.as_of,
             "question": s.text_of("user").rsplit("Question:", 1)[-1].strip(), "reference": s.text_of("assistant"),
             "answer": g.text, "new_tokens": g.new_tokens} | score_answer(s, g.text)
            for s, g in zip(answer_samples, generated)]
    log(f"  {len(rows)} answers")
    overall, per_family = summarize(rows)
    # latency as one user sees it: a single request (batch 1, KV cache), on the first answer sample
    single = generate(model, tokenizer, answer_samples[0].messages[:-1], sampling) if answer_samples else None
    return SetScores(
        loss=round(loss, 4), overall=overall, per_family=per_family, rows=rows,
        latency_s=round(single.seconds, 3) if single else 0.0,
        tokens_per_s=round(single.tokens_per_s, 1) if single else 0.0,
    )


@dataclass
class ModelScores:
    """One model variant (base, adapter or champion) on the validation subset and the golden set."""

    name: str
    val: SetScores | None
    golden: SetScores

    def as_dict(self) -> dict:
        return {"name": self.name, "val": self.val.as_dict() if self.val else None, "golden": self.golden.as_dict()}


def evaluate_variant(name: str, model, tokenizer, val_loss_samples: Sequence[Sample], val_answers: Sequence[Sample],
                     golden: Sequence[Sample], spec: EvalSpec, log: Callable[[str], None] = print,
                     with_val: bool = True) -> ModelScores:
    sampling = Sampling(max_new_tokens=spec.max_new_tokens)
    log(f"evaluating {name}: golden set ({len(golden)} answers)")
    golden_scores = score_set(model, tokenizer, golden, golden, sampling, log)
    val_scores = None
    if with_val:
        log(f"evaluating {name}: validation ({len(val_loss_samples)} for loss, {len(val_answers)} answers)")
        val_scores = score_set(model, tokenizer, val_loss_samples, val_answers, sampling, log)
    return ModelScores(name=name, val=val_scores, golden=golden_scores)


def evaluate_base_and_adapter(base_dir: str, adapter_dir: str, val: Sequence[Sample], golden: Sequence[Sample],
                              spec: EvalSpec, log: Callable[[str], None] = print) -> tuple[ModelScores, ModelScores]:
    """The base model and base + adapter, from one load: the base is the PeftModel with its adapter disabled."""
    model, tokenizer = load_chat_model(base_dir, adapter_dir)
    val_answers = pick_per_family(val, spec.val_answers_per_family, spec.seed)
    val_loss = loss_subset(val, spec.loss_samples, spec.seed)
    with model.disable_adapter():
        base = evaluate_variant("base", model, tokenizer, val_loss, val_answers, golden, spec, log)
    adapter = evaluate_variant("adapter", model, tokenizer, val_loss, val_answers, golden, spec, log)
    return base, adapter


def evaluate_champion(base_dir: str, adapter_dir: str, golden: Sequence[Sample], spec: EvalSpec,
                      log: Callable[[str], None] = print) -> ModelScores:
    """The current champion on the golden set (its own base: a champion may predate a base change)."""
    model, tokenizer = load_chat_model(base_dir, adapter_dir)
    return evaluate_variant("champion", model, tokenizer, [], [], golden, spec, log, with_val=False)
