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


@pytest.mark.parametrize("int8", [False, True], ids=["full-weights", "int8-decode"])
def test_drafted_answers_are_the_token_by_token_answers(tiny, chats, int8):
    """Speculative decoding from looked-up drafts changes no token: each position's arithmetic is the same whether
    it is checked alone or with drafts (on this CPU's kernels, which ``rows_differ`` checks at load)."""
    drafted = lean.LeanChatModel(tiny["base"], int8=int8)
    alone = lean.LeanChatModel(tiny["base"], int8=int8, draft_tokens=0)
    assert drafted.draft_tokens == (0 if drafted.no_drafts else lean.DECODE_ROWS - 1)
    sampling = Sampling(max_new_tokens=150)  # past the first block of keys: steps must not straddle two
    for messages in chats * 2:  # the second round also drafts from the first round's answers
        ours, theirs = drafted.generate(messages, sampling), alone.generate(messages, sampling)
        assert (ours.text, ours.new_tokens) == (theirs.text, theirs.new_tokens)
    if drafted.no_drafts is None:
        stats = drafted.drafting
        assert stats["kept"] > 50 and stats["passes"] < sum(  # fewer passes than tokens: drafts were kept
            alone.generate(m, sampling).new_tokens for m in chats) * 2
    assert alone.drafting["passes"] == 0


def test_rows_differ_names_a_kernel_whose_rows_depend_on_each_other(tiny):
    model = lean.LeanLlama(tiny["base"], int8=True)
    assert model.rows_differ() in (None, *(f"the {m} matrix gives a row other numbers next to other rows"
                                           for m in ("qkv", "o_proj", "gate_up", "down_proj", "lm_head")),
                                   "the decode attention gives a query other numbers in another row")

    class RowDependentKernel(lean.LeanLlama):  # a stand-in for a BLAS whose result depends on the batch
        def _linear(self, name, x):
            return super()._linear(name, x) + 1e-2 * x.shape[-2]

    assert RowDependentKernel(tiny["base"], int8=True).rows_differ() == \
        "the qkv matrix gives a row other numbers next to other rows"


@pytest.mark.parametrize("int8", [False, True], ids=["full-weights", "int8-decode"])
def test_a_decode_steps_rows_get_their_own_numbers_at_smollm2s_shape(tmp_path, int8):
    """At SmolLM2-135M's shapes (one layer, random weights), the padded decode attention gives every query row the
    numbers it gets alone (its shapes never change); a matrix kernel is the CPU's BLAS, which drafting checks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    why = lean.LeanLlama(tmp_path, int8=int8).rows_differ()
    assert why is None or "matrix" in why, why


def test_the_system_turn_is_computed_once_and_changes_no_answer(tiny, chats):
    """The system turn's keys and values are kept between answers (it opens every prompt); the prompt is always
    computed in two parts, so an answer is the same whether they were kept or not."""
    warm = lean.LeanChatModel(tiny["base"], int8=True)
    sampling = Sampling(max_new_tokens=24)
    answers = [warm.generate(messages, sampling).text for messages in chats]
    assert answers == [lean.LeanChatModel(tiny["base"], int8=True).generate(m, sampling).text for m in chats]
    ids = warm.tokenizer.encode(chats[0])
    split = warm._system_turn(chats[0], ids)
    assert warm._system[0] == ids[:split] and 10 < split < len(ids)
    assert warm.tokenizer.decode(ids[:split]).strip().startswith("system")
    assert warm._system_turn(chats[0][1:], warm.tokenizer.encode(chats[0][1:])) == 0  # no system turn, no split
    with torch.inference_mode():  # the two-part prompt's logits are the one-pass prompt's, up to rounding
        whole = warm.model.forward(torch.tensor([ids]), 0, warm.model.new_cache(len(ids)))
        parts = warm._prefill(chats[0], ids, warm.model.new_cache(len(ids)))
    assert torch.allclose(whole, parts, atol=1e-4), (whole - parts).abs().max()


def test_a_decode_step_stays_within_one_block_of_keys(tiny):
    model = lean.LeanLlama(tiny["base"], int8=False)
    cache = model.new_cache(3 * lean.KEY_BLOCK)
    with torch.inference_mode():
        model.forward(torch.tensor([[1] * 10]), 0, cache)
        model.forward(torch.tensor([[1] * 4]), lean.KEY_BLOCK - 4, cache)  # the block's last four positions
        with pytest.raises(ValueError, match="within one block"):
            model.forward(torch.tensor([[1] * 2]), lean.KEY_BLOCK - 1, cache)
        with pytest.raises(ValueError, match="at most 4 positions"):
            model.forward(torch.tensor([[1] * 5]), 10, cache)


def test_int8_matrices_read_from_disk_are_aligned(tiny, tmp_path):
    """PyTorch's int8 kernel read a 4-row product's matrix past its end (SIGSEGV) when the matrix sat at the 8-byte
    offset safetensors gives it: the matrices are copied into aligned memory at load."""
    folder = Path(shutil.copytree(tiny["base"], tmp_path / "merged"))
    lean.write_int8(folder)
    assert all(q.data_ptr() % 64 == 0 and scale.data_ptr() % 64 == 0 for q, scale in lean.load_int8(folder).values())
