"""Score models on held-out chat samples: teacher-forced loss, and greedy answers scored strictly against the
samples' facts (``finpipe.evaluation.strict``), per family, per golden part and overall, with bootstrap
intervals; plus the forgetting probe.

Every model variant is scored the same way on the same samples:
- ``loss``: mean cross-entropy of the reference answer's tokens given the prompt (assistant tokens only),
  and its perplexity ``exp(loss)``;
- answers generated greedily with the KV cache (bounded tokens, in batches), scored with the strict metrics
  (number correctness, label correctness, exact match), format validity, and token F1 / ROUGE-L as secondary
  text-overlap metrics;
- latency of a single answer and its generation tokens/s (batch 1, KV cache);
- the forgetting probe (``finpipe.evaluation.forgetting``): general instructions, share answered right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from finpipe.evaluation import metrics as m
from finpipe.evaluation.generation import Sampling, generate, generate_batch
from finpipe.evaluation.golden import PARTS, part_of, pick_per_family
from finpipe.evaluation.stats import bootstrap_ci
from finpipe.evaluation.strict import strict_score
from finpipe.instructions.samples import Sample
from finpipe.settings import setting

#: strict answer metrics: a wrong answer scores 0 on them (the headline, with intervals)
STRICT_METRICS = ("number_correctness", "label_correctness", "exact_match")
HEADLINE_METRICS = (*STRICT_METRICS, "format_validity")
#: every metric averaged per family, per part and overall (None values, e.g. no labels expected, are skipped);
#: token F1 and ROUGE-L measure text overlap with the reference, a secondary signal
ANSWER_METRICS = (*HEADLINE_METRICS, "token_f1", "rouge_l")
#: bump when scoring changes: cached scores of another version are recomputed
SCORER_VERSION = 2


def quality_score(overall: dict) -> float:
    """Mean of the strict metrics (number correctness, label correctness, exact match) a set defines: one
    number per model for promotion, study plots and Pareto frontiers."""
    values = [overall.get(k) for k in STRICT_METRICS]
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else 0.0


@dataclass(frozen=True)
class EvalSpec:
    """How adapters are evaluated; sized for 2 CPU cores (about a minute per model with SmolLM2-135M in bf16)."""

    val_answers_per_family: int = setting(0, "greedy answers generated per family on the validation split (0 = "
                                          "loss only: the golden set and the learning curve carry the answers)")
    golden_per_family: int = setting(10, "golden set size per family, balanced across labels (used once, when the "
                                     "set is frozen)")
    golden_paraphrase_share: float = setting(0.5, "share of golden questions asked in a held-out wording (used once)")
    loss_samples: int = setting(21, "validation samples for the teacher-forced loss (spread over the families)")
    max_new_tokens: int = setting(96, "longest generated answer (greedy; the longest reference is ~82 tokens)")
    batch_size: int = setting(16, "answers generated at once: 16 is as fast as 128 on a 2-core CPU and bounds memory "
                                  "(the 152 end-to-end answers: 81 s and 2.1 GB at 16, 88 s and 8.7 GB at 128; "
                                  "docs/benchmarks.md)")
    regression_tolerance: float = setting(0.05, "allowed drop vs the champion on each strict golden metric")
    forgetting_tolerance: float = setting(0.10, "allowed drop vs the base model on the forgetting probe")
    seed: int = setting(0, "seed of the subsets and the bootstrap")

    def __post_init__(self) -> None:
        if self.val_answers_per_family < 0:
            raise ValueError(f"invalid evaluation config: val_answers_per_family must be >= 0, got "
                             f"{self.val_answers_per_family}")
        for name in ("golden_per_family", "loss_samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"invalid evaluation config: {name} must be > 0, got {getattr(self, name)}")
        for name in ("regression_tolerance", "forgetting_tolerance"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"invalid evaluation config: {name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.golden_paraphrase_share <= 1:
            raise ValueError("invalid evaluation config: golden_paraphrase_share must be in [0, 1], got "
                             f"{self.golden_paraphrase_share}")

    def cache_key(self) -> str:
        """What makes two evaluations of one model on one golden set interchangeable."""
        # the batch too: bf16 padding moves an answer or two between batch sizes
        return f"v{SCORER_VERSION}-t{self.max_new_tokens}-s{self.seed}-b{self.batch_size}"


@dataclass
class SetScores:
    """One model on one sample set."""

    loss: float
    overall: dict[str, float | None]
    per_family: dict[str, dict[str, float | None]]
    rows: list[dict] = field(default_factory=list)  # one per generated answer (answer text, metrics, timing)
    latency_s: float | None = None  # seconds for one answer (batch 1); None: not measured (no answer samples)
    tokens_per_s: float = 0.0  # generated tokens / generation seconds (batch 1)
    ci: dict[str, list[float] | None] = field(default_factory=dict)  # headline metric -> 95% bootstrap interval
    parts: dict[str, dict[str, float | None]] = field(default_factory=dict)  # golden part -> metric means

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    def as_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "overall": self.overall, "ci": self.ci,
                "parts": self.parts, "per_family": self.per_family, "latency_s": self.latency_s,
                "tokens_per_s": self.tokens_per_s}


def assistant_loss(model, tokenizer, samples: Sequence[Sample], batch_size: int = 16) -> float:
    """Mean token cross-entropy of each sample's answer given its prompt (system + user turns).

    The answer tokens are those after the templated prompt with its generation prompt; this works for any
    chat template whose prompt is a prefix of the full conversation (no ``{% generation %}`` markers needed).
    Rows are left-padded, so every answer ends its row and only the last positions go through the vocabulary
    projection (``logits_to_keep``): a fraction of the cost of full logits.
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
        sequences.append((full, len(full) - len(prompt)))  # (ids, answer length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total_nll, total_tokens = 0.0, 0
    model_device = next(model.parameters()).device
    with torch.inference_mode():
        for i in range(0, len(sequences), batch_size):
            chunk = sequences[i: i + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            keep = max(n for _, n in chunk) + 1  # the position before the first answer token predicts it
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), keep), -100, dtype=torch.long)
            for row, (ids, n) in enumerate(chunk):
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention[row, width - len(ids):] = 1
                labels[row, keep - n:] = torch.tensor(ids[len(ids) - n:])
            position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=input_ids.to(model_device), attention_mask=attention.to(model_device),
                           position_ids=position_ids.to(model_device), logits_to_keep=keep).logits
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
    """Every answer metric of one answer, and what was wrong with it (``problems``)."""
    reference = sample.text_of("assistant")
    strict = strict_score(sample.family, sample.facts, sample.labels, sample.text_of("user"), answer)
    return {
        "number_correctness": strict.number_correctness,
        "label_correctness": strict.label_correctness,
        "exact_match": strict.exact_match,
        "format_validity": float(m.format_valid(answer)),
        "token_f1": m.token_f1(answer, reference),
        "rouge_l": m.rouge_l(answer, reference),
        "problems": strict.problems,
    }


def metric_means(group: Sequence[dict]) -> dict[str, float | None]:
    """The mean of each answer metric over the rows that have it (None where none does)."""
    out: dict[str, float | None] = {}
    for name in ANSWER_METRICS:
        values = [r[name] for r in group if r.get(name) is not None]
        out[name] = round(sum(values) / len(values), 4) if values else None
    return out


def summarize(rows: Sequence[dict], seed: int = 0) -> dict:
    """Means of ``ANSWER_METRICS`` overall, per family and per golden part, and a bootstrap 95% interval for
    each headline metric (a metric no row defines is None)."""
    families = sorted({r["family"] for r in rows})
    parts = {p: metric_means([r for r in rows if r.get("part", "seen") == p]) for p in PARTS
             if any(r.get("part", "seen") == p for r in rows)}
    per_family = {f: metric_means([r for r in rows if r["family"] == f]) for f in families}
    return {"overall": metric_means(rows), "per_family": per_family,
            "parts": parts, "ci": {k: _ci([r.get(k) for r in rows], seed) for k in HEADLINE_METRICS}}


def _ci(values: list, seed: int) -> list[float] | None:
    interval = bootstrap_ci([v for v in values if v is not None], seed=seed)
    return list(interval) if interval else None


def score_answers(samples: Sequence[Sample], answers: Sequence[str]) -> list[dict]:
    """One row per answer: the sample's identity, the question, the reference, the answer and its metrics."""
    return [{"id": s.id, "family": s.family, "part": part_of(s), "tickers": ",".join(s.tickers), "as_of": s.as_of,
             "question": s.text_of("user").rsplit("Question:", 1)[-1].strip(), "reference": s.text_of("assistant"),
             "answer": a} | score_answer(s, a) for s, a in zip(samples, answers)]


def score_set(model, tokenizer, loss_samples: Sequence[Sample], answer_samples: Sequence[Sample],
              sampling: Sampling, log: Callable[[str], None] = lambda _: None, batch_size: int = 64,
              seed: int = 0) -> SetScores:
    fused = loss_samples is answer_samples  # the golden set: its loss comes with its answers' prefill
    loss = assistant_loss(model, tokenizer, loss_samples) if loss_samples and not fused else float("nan")
    generated = generate_batch(model, tokenizer, [s.messages[:-1] for s in answer_samples], sampling, batch_size,
                               progress=log,
                               references=[s.text_of("assistant") for s in answer_samples] if fused else None)
    if fused and generated:
        loss = sum(g.reference_nll or 0.0 for g in generated) / max(1, sum(g.reference_tokens for g in generated))
    rows = score_answers(answer_samples, [g.text for g in generated])
    for row, g in zip(rows, generated):
        row["new_tokens"] = g.new_tokens
    summary = summarize(rows, seed)
    # latency as one user sees it: a single request (batch 1, KV cache), on the first answer sample
    single = generate(model, tokenizer, answer_samples[0].messages[:-1], sampling) if answer_samples else None
    return SetScores(
        loss=round(loss, 4), overall=summary["overall"], per_family=summary["per_family"], rows=rows,
        latency_s=round(single.seconds, 3) if single else None,
        tokens_per_s=round(single.tokens_per_s, 1) if single else 0.0, ci=summary["ci"], parts=summary["parts"],
    )


def forgetting_probe(model, tokenizer, batch_size: int = EvalSpec.batch_size, log=None) -> dict:
    """The forgetting probe's score and its answers (``finpipe.evaluation.forgetting``); ``log`` hears its progress."""
    from finpipe.evaluation.forgetting import MAX_NEW_TOKENS, probe_chats, score_probe

    answers = generate_batch(model, tokenizer, probe_chats(), Sampling(max_new_tokens=MAX_NEW_TOKENS), batch_size,
                             progress=log)
    score, rows = score_probe([a.text for a in answers])
    return {"score": score, "rows": [{"question": r.question, "answer": r.answer, "right": r.right} for r in rows]}


@dataclass
class ModelScores:
    """One model variant (base, adapter or champion) on the validation subset, the golden set and the probe."""

    name: str
    val: SetScores | None
    golden: SetScores | None
    forgetting: dict | None = None  # {"score", "rows"}
    #: the golden and wild questions through the answering path (``finpipe.evaluation.end_to_end``):
    #: {"summary", "rows", "digest"}
    end_to_end: dict | None = None

    def as_dict(self) -> dict:
        return {"name": self.name, "val": self.val.as_dict() | {"rows": self.val.rows} if self.val else None,
                "golden": self.golden.as_dict() | {"rows": self.golden.rows} if self.golden else None,
                "forgetting": self.forgetting, "end_to_end": self.end_to_end}


def evaluate_variant(name: str, model, tokenizer, val_loss_samples: Sequence[Sample], val_answers: Sequence[Sample],
                     golden: Sequence[Sample], spec: EvalSpec, log: Callable[[str], None] = print,
                     with_forgetting: bool = True, end_to_end=None, retry: bool = False) -> ModelScores:
    """Score one loaded model on whichever of the sets are given (an empty set is skipped); ``end_to_end``: an
    ``EndToEndSet`` to answer through the answering path as well (``retry``: with the retry policy)."""
    from finpipe.evaluation.end_to_end import evaluate_end_to_end, prompt_key

    sampling = Sampling(max_new_tokens=spec.max_new_tokens)
    golden_scores = val_scores = forgetting = e2e = None
    if golden:
        log(f"evaluating {name}: golden set ({len(golden)} answers)")
        golden_scores = score_set(model, tokenizer, golden, golden, sampling, log, spec.batch_size, spec.seed)
    if end_to_end is not None:
        log(f"evaluating {name}: end to end ({len(end_to_end.questions)} questions, as `finpipe ask` answers them)")
        known = {prompt_key(s.messages[:-1]): row["answer"]
                 for s, row in zip(golden, golden_scores.rows)} if golden_scores else {}
        resample = None
        if retry:  # the `retry` policy: unverified answers sampled again (finpipe.inference.answering)
            from dataclasses import replace as with_

            from finpipe.inference.answering import RETRY_TEMPERATURE

            sampled = with_(sampling, temperature=RETRY_TEMPERATURE)
            resample = lambda chats: generate_batch(model, tokenizer, chats, sampled, spec.batch_size)  # noqa: E731
        e2e = evaluate_end_to_end(end_to_end, lambda chats: generate_batch(model, tokenizer, chats, sampling,
                                                                           spec.batch_size, progress=log),
                                  known, spec.seed, resample)
    if val_answers or val_loss_samples:
        log(f"evaluating {name}: validation ({len(val_loss_samples)} for loss, {len(val_answers)} answers)")
        val_scores = score_set(model, tokenizer, val_loss_samples, val_answers, sampling, log, spec.batch_size,
                               spec.seed)
    if with_forgetting:
        log(f"evaluating {name}: forgetting probe")
        forgetting = forgetting_probe(model, tokenizer, spec.batch_size, log)
    return ModelScores(name=name, val=val_scores, golden=golden_scores, forgetting=forgetting, end_to_end=e2e)


def evaluate_model(name: str, base_dir: str, adapter_dir: str | None, val: Sequence[Sample], golden: Sequence[Sample],
                   spec: EvalSpec, log: Callable[[str], None] = print, with_val: bool = True,
                   with_golden: bool = True, with_forgetting: bool = True, end_to_end=None,
                   retry: bool = False) -> ModelScores:
    """Load one model (the base, or the base with an adapter merged in, at the device's inference precision) and
    score it; the weights are freed afterwards."""
    from finpipe.evaluation.generation import load_chat_model
    from finpipe.runtime import release_memory

    model, tokenizer = load_chat_model(base_dir, adapter_dir, merge=adapter_dir is not None)
    try:
        val_answers = pick_per_family(val, spec.val_answers_per_family, spec.seed) \
            if with_val and val and spec.val_answers_per_family else []
        val_loss = loss_subset(val, spec.loss_samples, spec.seed) if with_val and val else []
        return evaluate_variant(name, model, tokenizer, val_loss, val_answers, golden if with_golden else [], spec,
                                log, with_forgetting, end_to_end, retry)
    finally:
        del model
        release_memory()
