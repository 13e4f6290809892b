"""The general replay set (``finpipe.instructions.general``) answered by the base model, once per base: the
answers are generated at the inference precision and cached beside the adapters, keyed by the base's weights and
the prompt bank's version, so a nightly run pays nothing for it.

Only right answers are kept (rejection sampling): the greedy answer when it states the prompt's accepted answer, else
the first right one of ``RETRIES`` sampled rounds, else none. An open-ended prompt keeps its complete greedy answer.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable

from finpipe.evaluation.forgetting import find_answer, is_right
from finpipe.instructions.general import GeneralPrompt
from finpipe.instructions.samples import Sample, read_jsonl, sample_id, write_jsonl

MAX_NEW_TOKENS = 96
RETRIES = 2
RETRY_TEMPERATURE = 0.8  # sampled rounds for the prompts whose greedy answer was wrong
ORIGIN = "replay:base"


def stated_numbers(text: str) -> set[float]:
    """The numbers an answer states ("26 minus 13 is 23" -> {26, 13, 23})."""
    return {float(n) for n in re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?", text)}


def is_kept(prompt: GeneralPrompt, answer: str) -> bool:
    """A replayable answer: not empty, stating the prompt's right answer (whole words, as the forgetting probe
    scores), and for arithmetic no number but the operands and the result ("23 - 13 = 16, so the answer is 10" is not
    kept)."""
    if not answer.strip():
        return False
    if prompt.accepted is None:
        return True
    if not is_right(answer, prompt.accepted):
        return False
    return not prompt.operands or stated_numbers(answer) <= {*map(float, prompt.operands), float(prompt.accepted)}


def through_the_answer(text: str, accepted: str | None) -> str:
    """The answer up to the end of the sentence that states ``accepted`` ("12 * 5 = 60\n\nThis is the result of
    ..." -> "12 * 5 = 60"): the replay teaches answering, then stopping (the base's errors live in its rambling on)."""
    if accepted is None:
        return text
    found = find_answer(text, accepted)
    if not found:
        return text
    end = re.compile(r"[.!?](?=\s|$)|\n").search(text, found.end())
    return text[: end.end() if end else len(text)].strip()


def _key(base_dir: Path) -> str:
    from finpipe.instructions.general import VERSION

    stamp = [str(base_dir.resolve()), f"v{VERSION}", f"t{MAX_NEW_TOKENS}"]
    stamp += [f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in sorted(base_dir.glob("*.safetensors"))]
    return hashlib.sha256("|".join(stamp).encode()).hexdigest()[:16]


def general_replay(base_dir: str | Path, cache_dir: Path, log: Callable[[str], None] = print) -> list[Sample]:
    """The base model's right answers to the general prompts, as chat samples (no system prompt, as they are
    asked)."""
    import torch

    from finpipe.evaluation.generation import Sampling, generate_batch, load_chat_model
    from finpipe.instructions.general import general_prompts
    from finpipe.runtime import release_memory

    base_dir = Path(base_dir)
    path = cache_dir / f"general-replay-{_key(base_dir)}.jsonl"
    if path.exists():
        return read_jsonl(path)
    prompts = general_prompts()
    log(f"general replay: the base model answers {len(prompts)} general prompts (once per base model)")
    model, tokenizer = load_chat_model(base_dir)

    def answer(items, sampling: Sampling):
        chats = [[{"role": "user", "content": p.prompt}] for p in items]
        return generate_batch(model, tokenizer, chats, sampling, batch_size=len(chats), progress=log)  # one batch

    def keep(item, generated) -> bool:  # a cut-off answer would teach stopping mid-sentence
        return generated.new_tokens < MAX_NEW_TOKENS and is_kept(item, generated.text)

    kept: dict[int, str] = {}
    for i, generated in enumerate(answer(prompts, Sampling(max_new_tokens=MAX_NEW_TOKENS))):
        if keep(prompts[i], generated):
            kept[i] = through_the_answer(generated.text, prompts[i].accepted)
    greedy = len(kept)
    torch.manual_seed(0)  # the sampled rounds are reproducible
    for _ in range(RETRIES):
        missing = [i for i, p in enumerate(prompts) if i not in kept and p.accepted is not None]
        if not missing:
            break
        sampled = answer([prompts[i] for i in missing], Sampling(MAX_NEW_TOKENS, temperature=RETRY_TEMPERATURE))
        for i, generated in zip(missing, sampled):
            if keep(prompts[i], generated):
                kept[i] = through_the_answer(generated.text, prompts[i].accepted)
    model = None  # freed before training starts
    release_memory()
    samples = []
    for i in sorted(kept):
        messages = [{"role": "user", "content": prompts[i].prompt}, {"role": "assistant", "content": kept[i]}]
        samples.append(Sample(id=sample_id("general", [], None, messages), family="general", tickers=[], as_of=None,
                              messages=messages, origin=ORIGIN))
    write_jsonl(samples, path)
    summary = {"base": str(base_dir), "prompts": len(prompts), "samples": len(samples), "greedy_kept": greedy,
               "sampled_kept": len(samples) - greedy, "dropped": len(prompts) - len(samples)}
    path.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    log(f"general replay: kept {len(samples)} right answers of {len(prompts)} ({greedy} greedy, "
        f"{len(samples) - greedy} sampled)")
    return samples
