"""Int8 decode steps (``finpipe.models.int8_decode``) on a tiny real Llama with a LoRA adapter: prompts are prefilled
with the full weights (bit for bit), single-token steps read int8 weights (close to, not equal to, the full ones),
and the choice is validated before anything loads."""

import pytest
import torch

from finpipe.evaluation.generation import DecodeSpec, Sampling, generate, load_chat_model
from finpipe.models.int8_decode import DEFAULT_MAX_ROWS, enable_int8_decode, uses_int8_decode

QUESTION = [{"role": "user", "content": "What is AAPL's trend over 20 days?"}]


def test_int8_decode_prefills_with_the_full_weights_and_decodes_with_int8(tiny):
    full, tokenizer = load_chat_model(tiny["base"], tiny["adapter"], merge=True)
    int8, _ = load_chat_model(tiny["base"], tiny["adapter"], merge=True)
    linears = sum(type(m) is torch.nn.Linear for m in int8.modules())
    assert enable_int8_decode(int8) == linears == 2 * 7 + 1  # 2 layers x (q, k, v, o, gate, up, down) + the head
    assert uses_int8_decode(int8) and not uses_int8_decode(full)

    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert prompt["input_ids"].shape[1] > DEFAULT_MAX_ROWS
    with torch.inference_mode():
        assert torch.equal(full(**prompt).logits, int8(**prompt).logits)  # many rows: the full weights, exactly
        one = {"input_ids": prompt["input_ids"][:, :1], "attention_mask": prompt["attention_mask"][:, :1]}
        exact, approx = full(**one).logits.float(), int8(**one).logits.float()
    assert not torch.equal(exact, approx)  # one row: the int8 weights
    assert (approx - exact).abs().max() <= 0.05 * exact.abs().max()  # ... within int8's rounding

    answer = generate(int8, tokenizer, QUESTION, Sampling(max_new_tokens=6))
    assert 1 <= answer.new_tokens <= 6


def test_decode_choice_merges_the_adapter_and_is_validated_before_loading(tiny):
    model, _ = load_chat_model(tiny["base"], tiny["adapter"], decode=DecodeSpec("int8"))
    assert uses_int8_decode(model) and not hasattr(model, "peft_config")  # int8 needs the adapter merged in
    model, _ = load_chat_model(tiny["base"], tiny["adapter"], decode=DecodeSpec("full"))
    assert not uses_int8_decode(model) and hasattr(model, "peft_config")

    assert DecodeSpec().int8_on("cpu") and not DecodeSpec().int8_on("cuda:0")  # auto: int8 on a CPU only
    assert not DecodeSpec("full").int8_on("cpu")
    with pytest.raises(ValueError, match="runs on a CPU only"):
        DecodeSpec("int8").int8_on("cuda")
    with pytest.raises(ValueError, match="invalid decode_weights 'fast': choose one of auto, int8, full"):
        DecodeSpec("fast")
