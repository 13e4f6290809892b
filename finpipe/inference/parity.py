"""Does the exported GGUF answer like the model it was exported from? Load it back with a reader that did not write
it (transformers' GGUF loader: its own tensor-name mapping, rotary re-ordering and tokenizer conversion), answer
the golden questions greedily, and compare with the merged model's answers.

The reference is the merged model with its weights rounded to the file's precision (f16, bf16) and computed in
float32, like the GGUF reader's dequantized weights: an f16/bf16 export must answer **identically**. q8_0 changes
the weights (8-bit blocks): its answers may differ, within a stated tolerance: at least ``Q8_MIN_IDENTICAL`` of the
answers identical and strict number correctness at most ``Q8_MAX_NUMBER_DROP`` below the reference's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from finpipe.instructions.samples import Sample

Q8_MAX_DROP = 0.03  # about 2 of 70 golden numbers/labels
READER = "transformers GGUF loader"


@dataclass
class Parity:
    file: str
    outtype: str
    reader: str
    answers: int
    identical: int
    number_correctness: float | None
    reference_number_correctness: float | None
    label_correctness: float | None
    reference_label_correctness: float | None
    passed: bool
    rule: str
    differing: list[dict]  # the first few answers that differ: question, reference, file

    def as_dict(self) -> dict:
        return asdict(self)


def _rounded(model, outtype: str):
    """The model with every weight rounded to the file's precision and back to float32 (in place)."""
    import torch

    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}.get(outtype)
    if dtype is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(dtype).to(torch.float32))
    return model


def _answers(model, tokenizer, samples: Sequence[Sample], max_new_tokens: int) -> list[str]:
    from finpipe.evaluation.generation import Sampling, generate_batch

    out = generate_batch(model, tokenizer, [s.messages[:-1] for s in samples], Sampling(max_new_tokens=max_new_tokens),
                         batch_size=64)
    return [g.text for g in out]


def _strict(samples: Sequence[Sample], answers: list[str]) -> tuple[float | None, float | None]:
    """Mean strict number and label correctness of ``answers`` (None where no sample has that kind of slot)."""
    from finpipe.evaluation.evaluate import metric_means, score_answers

    means = metric_means(score_answers(samples, answers))
    return means["number_correctness"], means["label_correctness"]


def check_gguf(gguf_path: Path, outtype: str, merged_dir: Path, samples: Sequence[Sample], max_new_tokens: int = 96,
               reference_answers: dict[str, list[str]] | None = None,
               log: Callable[[str], None] = print) -> Parity:
    """Answer ``samples`` with the GGUF file (read by transformers) and with the merged model at the file's
    precision; ``reference_answers`` caches the latter per precision across files."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finpipe.models.safe_loading import load_causal_lm, load_tokenizer
    from finpipe.runtime import release_memory

    key = outtype if outtype in ("f16", "bf16") else "f32"
    cache = reference_answers if reference_answers is not None else {}
    if key not in cache:
        log(f"parity: reference answers of the merged model at {key} ({len(samples)} golden questions)")
        reference = _rounded(load_causal_lm(merged_dir, dtype=torch.float32, device_map={"": "cpu"}), outtype)
        cache[key] = _answers(reference.eval(), load_tokenizer(merged_dir), samples, max_new_tokens)
        del reference
        release_memory()
    log(f"parity: {gguf_path.name} read back by the {READER}")
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if not tokenizer.chat_template:  # the file carries it; a reader that drops it gets finpipe's template back
        tokenizer.chat_template = load_tokenizer(merged_dir).chat_template
    answers = _answers(model, tokenizer, samples, max_new_tokens)
    del model
    release_memory()
    reference = cache[key]
    identical = sum(a == b for a, b in zip(answers, reference))
    (numbers, labels), (reference_numbers, reference_labels) = _strict(samples, answers), _strict(samples, reference)
    if outtype in ("f16", "bf16", "f32"):
        rule = "identical answers"
        passed = identical == len(samples)
    else:
        rule = f"number and label correctness each within {Q8_MAX_DROP} of the reference; identical share reported"
        passed = all(mine is None or theirs is None or mine >= theirs - Q8_MAX_DROP
                     for mine, theirs in ((numbers, reference_numbers), (labels, reference_labels)))
    differing = [{"question": s.text_of("user").rsplit("Question:", 1)[-1].strip(), "reference": b, "file": a}
                 for s, a, b in zip(samples, answers, reference) if a != b][:5]
    return Parity(gguf_path.name, outtype, READER, len(samples), identical, numbers, reference_numbers, labels,
                  reference_labels, passed, rule, differing)
