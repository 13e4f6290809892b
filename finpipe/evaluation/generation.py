"""Load a chat model (base, or base + PEFT adapter) and generate answers with the KV cache.

Evaluation, the CLI and the benchmarks all generate through here, so an answer is produced the same
way everywhere: the tokenizer's chat template, generation prompt, stop at end-of-turn.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from finpipe.models.chat_template import IM_END
from finpipe.settings import setting

DECODE_WEIGHTS = ("auto", "int8", "full")
#: reference answers whose logits are computed at once when scoring them (``_score_references``)
REFERENCE_ROWS = 8


@dataclass(frozen=True)
class DecodeSpec:
    """How an interactive model (``ask``, ``chat``, ``serve``) reads its weights while decoding. Evaluation always
    decodes with the full weights: it scores the model as trained."""

    decode_weights: str = setting("auto", "weights read per generated token: 'int8' (weight-only int8 for decode "
                                  "steps of up to 4 sequences, prompts prefilled at full precision; CPU only, 2.2x "
                                  "the tokens/s of merged fp32 on 2 cores, docs/shipping.md), 'full' (the model's own "
                                  "precision) or 'auto' (int8 on a CPU, full on CUDA)")

    def __post_init__(self) -> None:
        if self.decode_weights not in DECODE_WEIGHTS:
            raise ValueError(f"invalid decode_weights {self.decode_weights!r}: choose one of {', '.join(DECODE_WEIGHTS)}")

    def int8_on(self, device: str) -> bool:
        """Whether to decode with int8 weights on ``device`` (an explicit 'int8' off a CPU is an error)."""
        cpu = device.startswith("cpu")
        if self.decode_weights == "int8" and not cpu:
            raise ValueError(f"decode_weights 'int8' runs on a CPU only (the model is on {device}); use 'auto' or 'full'")
        return cpu and self.decode_weights in ("auto", "int8")


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. ``temperature == 0`` is greedy decoding (deterministic)."""

    max_new_tokens: int = 96
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_time_s: float | None = None  # stop generating after this many seconds (a server's bound)

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens <= 0:
            problems.append(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        import math

        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                problems.append(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.max_time_s is not None and not self.max_time_s > 0:
            problems.append(f"max_time_s must be > 0, got {self.max_time_s}")
        if problems:
            raise ValueError("invalid sampling: " + "; ".join(problems))

    def generate_kwargs(self) -> dict:
        kwargs: dict = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty,
                        "use_cache": True}
        if self.max_time_s is not None:
            kwargs["max_time"] = self.max_time_s
        if self.temperature > 0:
            kwargs |= {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
        else:
            kwargs |= {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return kwargs


@dataclass
class Generated:
    text: str
    new_tokens: int
    seconds: float
    # with ``references``: the reference answer's summed cross-entropy given the prompt, and its token count
    reference_nll: float | None = None
    reference_tokens: int = 0
    #: seconds to the first token (the prompt's prefill), where the generator measures it
    prefill_s: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def load_chat_model(base_dir: str | Path, adapter_dir: str | Path | None = None, device: str | None = None,
                    merge: bool = False, dtype=None, decode: DecodeSpec | None = None):
    """(model, tokenizer): the unquantized base at the device's inference precision (``runtime.inference_dtype``:
    bf16 where the CPU or GPU computes it natively), with the adapter applied by plain ``PeftModel.from_pretrained``;
    ``merge`` folds it into the weights (``merge_and_unload``: same greedy text, 1.26x the tokens/s on CPU in
    ``benchmarks.inference``) for serving, where nobody needs the adapter switched off.

    The tokenizer comes from the adapter folder when it has one (training saves it there), else the base's.
    ``dtype`` overrides the precision (e.g. fp32 to compare two ways of computing the same answer exactly).
    ``decode`` (interactive use): int8 decode steps (``finpipe.models.int8_decode``) where it says so; it needs a
    merged adapter (or none), so it implies ``merge``.
    """
    from finpipe.models.safe_loading import load_causal_lm, load_peft_adapter, load_tokenizer
    from finpipe.runtime import accelerator, claim_cpu_share, inference_dtype

    claim_cpu_share()
    device = device or accelerator()
    model = load_causal_lm(base_dir, dtype=dtype or inference_dtype(device), device_map={"": device})
    tokenizer_dir = adapter_dir if adapter_dir and (Path(adapter_dir) / "tokenizer_config.json").exists() else base_dir
    tokenizer = load_tokenizer(tokenizer_dir)
    int8 = decode is not None and decode.int8_on(device)
    if adapter_dir is not None:
        model = load_peft_adapter(model, adapter_dir)
        if merge or int8:
            model = model.merge_and_unload()
    if int8:
        from finpipe.models.int8_decode import enable_int8_decode, supports_int8_decode

        if decode.decode_weights == "int8" or supports_int8_decode(model):  # 'auto' falls back quietly
            enable_int8_decode(model)
    model.eval()
    return model, tokenizer


def stop_token_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id)


def generate(model, tokenizer, messages: list[dict[str, str]], sampling: Sampling = Sampling(),
             streamer=None, stopping_criteria=None) -> Generated:
    """One answer to a chat (system/user turns) with the KV cache; the reply text without template tokens.
    ``streamer``: a transformers streamer that receives the tokens as they are generated. ``stopping_criteria``: a
    ``StoppingCriteriaList`` that may end it early (a server's stop strings, a client that went away)."""
    import torch

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    prompt = {k: v.to(model.device) for k, v in prompt.items()}
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**prompt, **sampling.generate_kwargs(), eos_token_id=stop_token_ids(tokenizer),
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id, streamer=streamer, stopping_criteria=stopping_criteria)
    seconds = time.perf_counter() - started
    new = out[0, prompt["input_ids"].shape[1]:]
    return Generated(text=tokenizer.decode(new, skip_special_tokens=True).strip(), new_tokens=int(new.shape[0]),
                     seconds=seconds)


def generate_batch(model, tokenizer, chats: list[list[dict[str, str]]], sampling: Sampling = Sampling(),
                   batch_size: int = 8, progress=None, references: list[str] | None = None,
                   progress_every_s: float = 15.0, stopping_criteria=None) -> list[Generated]:
    """Answers to many chats, ``batch_size`` at a time (left padding): on a CPU a decoding step costs about
    the same for 1 or 8 sequences, so evaluation runs several times faster than one by one. ``seconds`` is
    the batch's wall time shared evenly; use ``generate`` to measure single-request latency. ``progress``, if
    given, is called with a line after each batch (answers done, of how many, elapsed) and every
    ``progress_every_s`` seconds within one (the token reached, the time left at most).

    ``references`` (one reference answer per chat) also scores each reference teacher-forced in the same forward
    pass that fills the prompt's KV cache (``reference_nll``/``reference_tokens``): the loss of an answered set
    costs no second pass over its prompts (half of a golden evaluation's compute on a CPU).

    ``stopping_criteria`` (a ``StoppingCriteriaList`` returning one flag per row of a batch) may end rows early: the
    server passes it for a single batch (``batch_size`` = the number of chats)."""
    import torch
    from transformers import StoppingCriteriaList

    from finpipe.runtime import rebalance

    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only: prompts end where generation starts
    results: list[Generated] = []
    begun = time.perf_counter()
    try:
        for i in range(0, len(chats), batch_size):
            rebalance()
            chunk = chats[i: i + batch_size]
            texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            if progress is not None and i == 0:  # the ticker's first line comes every_s after this: say it began
                progress(f"  answers 1-{len(chunk)} of {len(chats)}: generating, at most {sampling.max_new_tokens} "
                         "tokens each")
            started = time.perf_counter()
            scored: list[tuple[float | None, int]] = [(None, 0)] * len(chunk)
            cache = None
            with torch.inference_mode():
                if references is not None:
                    scored, cache = _score_references(model, tokenizer, chunk, texts, references[i: i + batch_size],
                                                      enc, pad)
                criteria = StoppingCriteriaList(stopping_criteria or [])
                if progress is not None:
                    criteria.extend(_progress_ticker(progress, f"  answers {i + 1}-{i + len(chunk)} of {len(chats)}",
                                                     sampling.max_new_tokens, progress_every_s))
                out = model.generate(**enc, **sampling.generate_kwargs(), eos_token_id=stops, pad_token_id=pad,
                                     **({"cache": cache} if cache is not None else {}),
                                     **({"stopping_criteria": criteria} if criteria else {}))
            share = (time.perf_counter() - started) / len(chunk)
            for row, (nll, n_ref) in zip(out[:, enc["input_ids"].shape[1]:].tolist(), scored):
                end = next((j for j, t in enumerate(row) if t in stops), None)
                kept = row[:end] if end is not None else row
                n = len(kept) + (1 if end is not None else 0)  # the stop token was generated too
                results.append(Generated(text=tokenizer.decode(kept, skip_special_tokens=True).strip(),
                                         new_tokens=n, seconds=share, reference_nll=nll, reference_tokens=n_ref))
            if progress is not None and len(chats) > batch_size:
                progress(f"  answers {len(results)}/{len(chats)} ({time.perf_counter() - begun:.0f} s)")
    finally:
        tokenizer.padding_side = side
    return results


def _progress_ticker(progress, what: str, max_new_tokens: int, every_s: float):
    """A stopping criterion that never stops: every ``every_s`` seconds of one batch's decoding it reports the token
    reached and the time left at most (the batch ends sooner when every answer has stopped)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Ticker(StoppingCriteria):
        def __init__(self):
            self.started = self.shown = time.perf_counter()
            self.steps = 0

        def __call__(self, input_ids, scores, **kwargs):
            self.steps += 1
            now = time.perf_counter()
            if now - self.shown >= every_s:
                self.shown = now
                left = (now - self.started) / self.steps * (max_new_tokens - self.steps)
                progress(f"{what}: token {self.steps}/{max_new_tokens} ({now - self.started:.0f} s, at most "
                         f"{left:.0f} s left)")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Ticker()])


def _score_references(model, tokenizer, chats, prompts: list[str], references: list[str], enc: dict, pad: int):
    """One forward pass over each left-padded prompt followed by its right-padded reference answer: the
    references' summed token cross-entropies, and the KV cache cropped to the prompt (less its last token, which
    ``generate`` feeds itself), so the answers are generated from the very same prefill.

    Causal attention makes the prompt's keys and values independent of what follows it, and position ids come
    from the attention mask as ``generate`` computes them."""
    import torch

    answers: list[list[int]] = []
    for chat, prompt, reference in zip(chats, prompts, references):
        full = tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": reference}], tokenize=False)
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError("the chat template's prompt is not a prefix of the conversation: cannot isolate the answer")
        answers.append(full_ids[len(prompt_ids):])
    prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]
    width = max(len(a) for a in answers)
    answer_ids = torch.full((len(answers), width), pad, dtype=torch.long)
    labels = torch.full((len(answers), width), -100, dtype=torch.long)
    for row, ids in enumerate(answers):
        answer_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(ids)
    answer_ids, labels = answer_ids.to(prompt_ids.device), labels.to(prompt_ids.device)
    input_ids = torch.cat([prompt_ids, answer_ids], dim=1)
    attention = torch.cat([prompt_mask, (labels != -100).long()], dim=1)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = getattr(causal, causal.base_model_prefix)(input_ids=input_ids, attention_mask=attention,
                                                   position_ids=position_ids, use_cache=True)
    # the last prompt position predicts the first answer token; the vocabulary projection and the loss run a few
    # rows at a time: all rows at once held rows x answer length x vocabulary logits three times over (bf16,
    # fp32, log-softmax), about 2.7 GB for the 70 golden answers of SmolLM2, the Quickstart's memory peak
    hidden = out.last_hidden_state[:, -(width + 1):-1]
    head = causal.get_output_embeddings()
    nll = torch.cat([torch.nn.functional.cross_entropy(
        head(hidden[i: i + REFERENCE_ROWS]).float().transpose(1, 2), labels[i: i + REFERENCE_ROWS],
        ignore_index=-100, reduction="none").sum(-1) for i in range(0, len(answers), REFERENCE_ROWS)])
    cache = getattr(out, "cache", None) or out.past_key_values
    cache.crop(-(width + 1))  # keep the prompt less its last token
    return [(float(v), len(a)) for v, a in zip(nll.tolist(), answers)], cache
