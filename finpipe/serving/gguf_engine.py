"""The llama.cpp engine: the champion's exported GGUF run by llama-cpp-python (``llama_cpp.Llama``).

Why: on a CPU llama.cpp decodes the q8_0 export several times faster than PyTorch decodes the merged model (77.9
against 28.2 tokens/s with int8 decode steps on the 2-core EPYC, docs/benchmarks.md). Only the token loop moves
here: the prompt is the very token ids finpipe's tokenizer makes (``apply_chat_template``, as the export's parity
check feeds llama.cpp) and the generated ids are decoded by finpipe's tokenizer, so grounding, verification, stop
strings and the streamed text see exactly the format the PyTorch engine gives them.

One generation at a time (the server's queue guarantees it; a ``Llama`` is not thread-safe); no batching: a request
is generated alone. llama-cpp-python is optional (PyPI has only its source): ``available`` says whether it can be
imported, and the import edge (``_llama_cpp``) turns its absence into one line naming what to do.
"""

from __future__ import annotations

import importlib.util
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from finpipe.evaluation.generation import Generated, Sampling

INSTALL_HINT = "pip install llama-cpp-python (it compiles llama.cpp from source, about 5 minutes; docs/shipping.md)"
#: GGUF ``general.file_type`` -> the type names finpipe's export writes
FILE_TYPES = {0: "f32", 1: "f16", 7: "q8_0", 32: "bf16"}


class LlamaCppMissing(ImportError):
    pass


def available() -> bool:
    """Whether llama-cpp-python can be imported here (without loading its library)."""
    try:
        return importlib.util.find_spec("llama_cpp") is not None
    except (ImportError, ValueError):
        return False


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise LlamaCppMissing(f"the llama.cpp engine needs llama-cpp-python, which is not installed: {INSTALL_HINT}"
                              ) from exc
    return llama_cpp


@dataclass
class GgufModel:
    llm: object  # llama_cpp.Llama
    path: Path
    precision: str  # the file's type: q8_0, bf16, ...
    n_ctx: int
    threads: int
    system_turns: dict = field(default_factory=dict)  # system prompt -> its token ids (the cached prefix)


def load(path: Path, threads: int) -> GgufModel:
    """The GGUF file in llama.cpp with the model's own context (``n_ctx=0``), ``threads`` for prompt and decode."""
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=0, n_threads=threads, n_threads_batch=threads,
                          logits_all=False, verbose=False)
    kind = llm.metadata.get("general.file_type")
    precision = FILE_TYPES.get(int(kind), f"file type {kind}") if kind is not None and str(kind).isdigit() \
        else "gguf"
    return GgufModel(llm, Path(path), precision, int(llm.n_ctx()), threads)


def _prefill_system_turn(model: GgufModel, tokenizer, messages: list[dict[str, str]], prompt: list[int]) -> None:
    """Leave llama.cpp's KV cache holding exactly the prompt's system turn (the same for every question: about a
    quarter of a grounded prompt), evaluated alone from position 0 unless it already is; ``generate`` then evaluates
    only the rest. Why a fixed boundary: llama-cpp-python's own reuse of the longest prefix shared with the previous
    request changes where the prompt's evaluation is split, which can round differently and change a greedy answer
    with what was asked before; split at the system turn, the same request always computes the same numbers."""
    llm = model.llm
    turn = []
    if messages and messages[0].get("role") == "system":
        system = messages[0]["content"]
        if system not in model.system_turns:
            model.system_turns[system] = list(tokenizer.apply_chat_template(messages[:1], tokenize=True,
                                                                            return_dict=True)["input_ids"])
        turn = model.system_turns[system]
    if not turn or len(turn) >= len(prompt) or prompt[:len(turn)] != turn:
        llm.reset()  # no such boundary: the whole prompt in one evaluation
        return
    if llm.n_tokens >= len(turn) and llm.input_ids[:len(turn)].tolist() == turn:
        llm.n_tokens = len(turn)  # the cached system turn is kept, anything after it dropped by ``generate``
    else:
        llm.reset()
        llm.eval(turn)


def generate(model: GgufModel, tokenizer, messages: list[dict[str, str]], sampling: Sampling, *, stop=(),
             cancel=None, seed: int | None = None, streamer=None) -> Generated:
    """One answer, token by token, until an end-of-turn token, ``max_new_tokens``, ``max_time_s``, one of ``stop``
    (strings), or ``cancel`` (an Event) is set. ``new_tokens`` counts the end-of-turn token, as the PyTorch engine's
    ``generate`` does; the text is decoded by finpipe's tokenizer without special tokens, stripped."""
    from finpipe.evaluation.generation import stop_token_ids
    from finpipe.serving.engine import follow_tokens

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    llm = model.llm
    greedy = sampling.temperature <= 0
    if not greedy:  # a seed given: the same answer for the same request; none: a fresh draw (never the last seed)
        llm.set_seed(seed if seed is not None else random.getrandbits(31))
    started = time.perf_counter()
    _prefill_system_turn(model, tokenizer, messages, list(prompt))
    tokens = llm.generate(list(prompt), temp=sampling.temperature if not greedy else 0.0,
                          top_p=sampling.top_p if not greedy else 1.0, top_k=0, min_p=0.0, typical_p=1.0,
                          repeat_penalty=sampling.repetition_penalty, reset=True)
    try:
        return follow_tokens(tokens, lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                             set(stop_token_ids(tokenizer)), sampling, started, stop=stop, cancel=cancel,
                             streamer=streamer)
    finally:
        tokens.close()  # leaves llama.cpp's state consistent for the next request
