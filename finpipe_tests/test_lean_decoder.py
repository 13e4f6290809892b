"""The lean decoder `ask` and `chat` use (finpipe.inference.lean) against transformers, on real prompts: the same
prompt tokens, the same greedy tokens (full weights and int8 decode steps), the same sampling rules."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from finpipe.evaluation.generation import DecodeSpec, Sampling, generate, load_chat_model
from finpipe.inference import lean
from finpipe.inference.answering import prepare
from finpipe.inference.context import LakeFacts

QUESTIONS = ("What is AAPL's trend?", "How volatile is MSFT right now?", "is goog overbought",
             "Which did better over 30 days, AAPL or MSFT?", "ibm px?")


@pytest.fixture
def chats(lake) -> list[list[dict[str, str]]]:
    facts = LakeFacts(lake)
    return [prepare(q, facts).messages for q in QUESTIONS]


@pytest.mark.parametrize("int8", [False, True], ids=["full-weights", "int8-decode"])
def test_greedy_answers_are_the_transformers_tokens(tiny, chats, int8):
    model, tokenizer = load_chat_model(tiny["base"], None, dtype=torch.float32,
                                       decode=DecodeSpec("int8" if int8 else "full"))
    chat = lean.LeanChatModel(tiny["base"], int8=int8)
    sampling = Sampling(max_new_tokens=24)
    for messages in chats:
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
        assert chat.tokenizer.encode(messages) == list(expected)
        assert chat.tokenizer.prompt(messages) == tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                                tokenize=False)
        ours, theirs = chat.generate(messages, sampling), generate(model, tokenizer, messages, sampling)
        assert (ours.text, ours.new_tokens) == (theirs.text, theirs.new_tokens)
        assert ours.new_tokens > 3  # a random tiny model rambles: the comparison covers many decode steps


def test_prefill_logits_match_transformers(tiny, chats):
    model, tokenizer = load_chat_model(tiny["base"], None, dtype=torch.float32, decode=DecodeSpec("full"))
    chat = lean.LeanChatModel(tiny["base"], int8=False)
    ids = chat.tokenizer.encode(chats[0])
    with torch.inference_mode():
        expected = model(torch.tensor([ids])).logits[0, -1].float()
        got = chat.model.forward(torch.tensor([ids]), 0, chat.model.new_cache(len(ids)))[0]
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(tiny, chats):
    chat = lean.LeanChatModel(tiny["base"], int8=False)
    greedy = chat.generate(chats[1], Sampling(max_new_tokens=16))
    assert chat.generate(chats[1], Sampling(max_new_tokens=16, temperature=1.0, top_p=1e-6)).text == greedy.text
    torch.manual_seed(3)
    first = chat.generate(chats[1], Sampling(max_new_tokens=16, temperature=1.5))
    torch.manual_seed(3)
    assert chat.generate(chats[1], Sampling(max_new_tokens=16, temperature=1.5)).text == first.text
    penalised = chat.generate(chats[1], Sampling(max_new_tokens=16, repetition_penalty=1e6))
    assert len(set(penalised.text.split())) == len(penalised.text.split())  # no word twice under a huge penalty


def test_int8_weights_written_once_are_the_ones_computed_at_load(tiny, tmp_path):
    folder = Path(shutil.copytree(tiny["base"], tmp_path / "merged"))
    computed = lean.quantize_int8(lean.LeanLlama(folder, int8=False).w)
    lean.write_int8(folder)
    stored = lean.load_int8(folder)
    assert stored.keys() == computed.keys() and "lm_head" in stored
    for name, (q, scale) in computed.items():
        assert torch.equal(stored[name][0], q) and torch.equal(stored[name][1], scale)


def test_an_architecture_it_does_not_mirror_is_named(tiny, tmp_path):
    assert lean.supports(tiny["base"]) is None
    folder = Path(shutil.copytree(tiny["base"], tmp_path / "other"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "qwen2", "attention_bias": True}))
    why = lean.supports(folder)
    assert "model_type is not 'llama'" in why and "biases" in why
