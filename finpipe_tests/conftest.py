"""Shared fixtures. Every test gets its own lake directory and never writes into the repo's data_lake/."""

from __future__ import annotations

import datetime as dt
import os
from functools import lru_cache
from pathlib import Path

import pytest

os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def isolated_lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    lake_dir = tmp_path / "lake"
    monkeypatch.setenv("FINPIPE_LAKE_DIR", str(lake_dir))
    for var in ("FINPIPE_SOURCE", "FINPIPE_UNIVERSE", "FINPIPE_REPLAY_AS_OF", "DAGSTER_HOME"):
        monkeypatch.delenv(var, raising=False)
    return lake_dir


@pytest.fixture
def lake_resources(isolated_lake: Path):
    """Dagster resources over the test's own lake; call with MarketDataResource overrides."""
    from finpipe.defs.resources import LakeResource, MarketDataResource

    def build(**market):
        return {"lake": LakeResource(lake_dir=str(isolated_lake)), "market_data": MarketDataResource(**market)}

    return build


def d(text: str) -> dt.date:
    return dt.date.fromisoformat(text)


@lru_cache(maxsize=1)
def tiny_split():
    """A small temporal split of real replay samples (every 9th session), for training tests."""
    from finpipe.instructions.split import SplitSpec, temporal_split
    from finpipe_tests.test_instruction_datasets import samples

    return temporal_split(samples(date_stride=9), SplitSpec(val_fraction=0.2))


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


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A 2-layer tiny Llama with a BPE tokenizer trained on the samples (seconds)."""
    from finpipe.models.scratch import train_tokenizer

    texts = [f"{s.text_of('user')}\n{s.text_of('assistant')}" for s in tiny_split().train]
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_base"), train_tokenizer(texts, vocab_size=600))
