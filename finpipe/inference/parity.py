"""Does the exported GGUF answer like the model it was exported from? Load it back with a reader that did not write
it (transformers' GGUF loader: its own tensor-name mapping, rotary re-ordering and tokenizer conversion), answer
the golden questions greedily, and compare with the merged model's answers.

The reference is the merged model with its weights rounded to the file's precision (f16, bf16) and computed in
float32, like the GGUF reader's dequantized weights: an f16/bf16 export must answer **identically**. q8_0 changes
the weights (8-bit blocks): its answers may differ, within a stated tolerance: at least ``Q8_MIN_IDENTICAL`` of the
answers identical and strict number correctness at most ``Q8_MAX_NUMBER_DROP`` below the reference's.

Where llama-cpp-python is installed, each file is also run by llama.cpp itself (``check_gguf_with_llama_cpp``): the
engine Ollama and llama.cpp users run it with. Its kernels round differently from PyTorch's, so for every type the
rule is the tolerance rule, with the identical share reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from finpipe.instructions.samples import Sample

Q8_MAX_DROP = 0.03  # about 2 of 70 golden numbers/labels
READER = "transformers GGUF loader"
LLAMA_CPP_READER = "llama.cpp (llama-cpp-python)"


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


def _answers(model, tokenizer, samples: Sequence[Sample], max_new_tokens: int, log=None) -> list[str]:
    from finpipe.evaluation.generation import Sampling, generate_batch

    out = generate_batch(model, tokenizer, [s.messages[:-1] for s in samples], Sampling(max_new_tokens=max_new_tokens),
                         batch_size=64, progress=log)
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
        cache[key] = _answers(reference.eval(), load_tokenizer(merged_dir), samples, max_new_tokens, log)
        del reference
        release_memory()
    log(f"parity: {gguf_path.name} read back by the {READER}")
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if not tokenizer.chat_template:  # the file carries it; a reader that drops it gets finpipe's template back
        tokenizer.chat_template = load_tokenizer(merged_dir).chat_template
    answers = _answers(model, tokenizer, samples, max_new_tokens, log)
    del model
    release_memory()
    return _verdict(gguf_path.name, outtype, READER, samples, answers, cache[key],
                    exact=outtype in ("f16", "bf16", "f32"))


def _verdict(file: str, outtype: str, reader: str, samples: Sequence[Sample], answers: list[str],
             reference: list[str], exact: bool) -> Parity:
    """``exact``: every answer must be identical; else the tolerance rule on strict number and label correctness."""
    identical = sum(a == b for a, b in zip(answers, reference))
    (numbers, labels), (reference_numbers, reference_labels) = _strict(samples, answers), _strict(samples, reference)
    if exact:
        rule = "identical answers"
        passed = identical == len(samples)
    else:
        rule = f"number and label correctness each within {Q8_MAX_DROP} of the reference; identical share reported"
        passed = all(mine is None or theirs is None or mine >= theirs - Q8_MAX_DROP
                     for mine, theirs in ((numbers, reference_numbers), (labels, reference_labels)))
    differing = [{"question": s.text_of("user").rsplit("Question:", 1)[-1].strip(), "reference": b, "file": a}
                 for s, a, b in zip(samples, answers, reference) if a != b][:5]
    return Parity(file, outtype, reader, len(samples), identical, numbers, reference_numbers, labels,
                  reference_labels, passed, rule, differing)


def llama_cpp_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def check_gguf_with_llama_cpp(gguf_path: Path, outtype: str, merged_dir: Path, samples: Sequence[Sample],
                              max_new_tokens: int = 96, reference_answers: dict[str, list[str]] | None = None,
                              log: Callable[[str], None] = print) -> Parity:
    """Answer ``samples`` with the GGUF file run by llama.cpp (greedy, the prompt's token ids from finpipe's
    tokenizer, so both engines read the very same prompt) and compare with the merged model's answers at the file's
    precision (``check_gguf`` computes and caches those first)."""
    import llama_cpp

    from finpipe.models.chat_template import IM_END
    from finpipe.models.safe_loading import load_tokenizer
    from finpipe.runtime import claim_cpu_share

    key = outtype if outtype in ("f16", "bf16") else "f32"
    if reference_answers is None or key not in reference_answers:
        raise ValueError(f"no reference answers at {key}: run check_gguf on a file of that precision first")
    log(f"parity: {gguf_path.name} run by {LLAMA_CPP_READER}")
    tokenizer = load_tokenizer(merged_dir)
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=1024, n_threads=claim_cpu_share(), verbose=False)
    answers = []
    for sample in samples:
        prompt = tokenizer.apply_chat_template(sample.messages[:-1], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        out = llm.create_completion(list(prompt), max_tokens=max_new_tokens, temperature=0.0, stop=[IM_END])
        answers.append(out["choices"][0]["text"].strip())
    del llm
    return _verdict(gguf_path.name, outtype, LLAMA_CPP_READER, samples, answers, reference_answers[key], exact=False)
