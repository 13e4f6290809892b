"""A tiny randomly initialised Llama (hidden 64) with a BPE tokenizer trained on given texts: for tests, the
benchmarks' quick modes and experiments that need a real model without the cost of one."""

from __future__ import annotations

from pathlib import Path


def make_tiny_llama(folder: Path, tokenizer, num_layers: int = 2) -> Path:
    """A randomly initialised Llama (hidden 64, intermediate 128) saved with ``tokenizer`` into ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_llama(folder: Path, texts: list[str], num_layers: int = 2, vocab_size: int = 600) -> Path:
    """``make_tiny_llama`` with a byte-level BPE tokenizer (finpipe's chat template) trained on ``texts``."""
    from finpipe.models.scratch import train_tokenizer

    return make_tiny_llama(folder, train_tokenizer(texts, vocab_size=vocab_size), num_layers=num_layers)
