"""The general replay set (``finpipe.instructions.general``) answered by the base model, once per base: the
answers are generated greedily at the inference precision and cached beside the adapters, keyed by the base's
weights and the prompt bank's version, so a nightly run pays nothing for it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from finpipe.instructions.samples import Sample, read_jsonl, sample_id, write_jsonl

MAX_NEW_TOKENS = 96
ORIGIN = "replay:base"


def _key(base_dir: Path) -> str:
    from finpipe.instructions.general import VERSION

    stamp = [str(base_dir.resolve()), f"v{VERSION}", f"t{MAX_NEW_TOKENS}"]
    stamp += [f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in sorted(base_dir.glob("*.safetensors"))]
    return hashlib.sha256("|".join(stamp).encode()).hexdigest()[:16]


def general_replay(base_dir: str | Path, cache_dir: Path, log: Callable[[str], None] = print) -> list[Sample]:
    """The base model's answers to the general prompts, as chat samples (no system prompt, as they are asked)."""
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
    answers = generate_batch(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                             Sampling(max_new_tokens=MAX_NEW_TOKENS), batch_size=len(prompts))  # one batch
    del model
    release_memory()
    samples = []
    for prompt, answer in zip(prompts, answers):
        if not answer.text or answer.new_tokens >= MAX_NEW_TOKENS:
            continue  # only complete answers: a cut-off one would teach the adapter to stop mid-sentence
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer.text}]
        samples.append(Sample(id=sample_id("general", [], None, messages), family="general", tickers=[], as_of=None,
                              messages=messages, origin=ORIGIN))
    write_jsonl(samples, path)
    (path.with_suffix(".json")).write_text(json.dumps({"base": str(base_dir), "prompts": len(prompts),
                                                       "samples": len(samples)}, indent=2))
    return samples
