"""Shared fixtures. Every test gets its own lake directory and never writes into the repo's data_lake/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dagster as dg
import pytest
import torch

from finpipe.instructions.builder import DatasetSpec, build_samples
from finpipe.market.lake import PriceLake
from finpipe.models import registry
from finpipe.paths import LAKE_DB_NAME
from finpipe.tracking import ENVIRONMENT as TRACKING_ENVIRONMENT
from finpipe_tests.helpers import ingest, lake_inputs, make_tiny_llama, tiny_split

os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")


@pytest.fixture(autouse=True)
def isolated_lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    lake_dir = tmp_path / "lake"
    monkeypatch.setenv("FINPIPE_LAKE_DIR", str(lake_dir))
    for var in ("FINPIPE_SOURCE", "FINPIPE_UNIVERSE", "FINPIPE_REPLAY_AS_OF", "DAGSTER_HOME", "MLFLOW_TRACKING_URI",
                *TRACKING_ENVIRONMENT.values()):
        monkeypatch.delenv(var, raising=False)
    return lake_dir


@pytest.fixture
def lake_resources(isolated_lake: Path):
    """Dagster resources over the test's own lake (MLflow tracking off); call with MarketDataResource overrides."""
    from finpipe.defs.resources import LakeResource, MarketDataResource, TrackingResource

    def build(**market):
        return {"lake": LakeResource(lake_dir=str(isolated_lake)), "market_data": MarketDataResource(**market),
                "tracking": TrackingResource()}

    return build


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A 2-layer tiny Llama with a BPE tokenizer trained on the samples (seconds)."""
    from finpipe.models.scratch import train_tokenizer

    texts = [f"{s.text_of('user')}\n{s.text_of('assistant')}" for s in tiny_split().train]
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_base"), train_tokenizer(texts, vocab_size=600))


# --------------------------------------------------------------- a replay lake with a tiny model (inference, serving)

@pytest.fixture(scope="session")
def lake_template(tmp_path_factory) -> Path:
    """The replay lake (4 tickers, 2011-03-01 .. 2013-03-01) with its price_statistics table."""
    from finpipe.defs.resources import LakeResource, MarketDataResource
    from finpipe.defs.statistics import price_statistics

    lake_dir = tmp_path_factory.mktemp("template_lake")
    resources = {"lake": LakeResource(lake_dir=str(lake_dir)), "market_data": MarketDataResource()}
    ingest(resources)
    assert dg.materialize([price_statistics], resources=resources).success
    return lake_dir / LAKE_DB_NAME


@pytest.fixture
def lake(lake_template: Path, isolated_lake: Path) -> PriceLake:
    """Each test gets its own copy of the lake (pointers and the run registry are written per test)."""
    isolated_lake.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(lake_template, isolated_lake / LAKE_DB_NAME)
    return PriceLake(isolated_lake / LAKE_DB_NAME)


@pytest.fixture(scope="session")
def tiny(lake_template: Path, tmp_path_factory) -> dict:
    """A tiny random Llama (base folder) and a random LoRA adapter on it (adapter folder), as training saves them."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from finpipe.models.scratch import train_tokenizer

    samples = build_samples(*lake_inputs(PriceLake(lake_template)), DatasetSpec(date_stride=9))
    tokenizer = train_tokenizer([f"{s.text_of('user')}\n{s.text_of('assistant')}" for s in samples], vocab_size=600)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    root = tmp_path_factory.mktemp("tiny")
    base_dir, adapter_dir = root / "base", root / "adapter"
    LlamaForCausalLM(config).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    # init_lora_weights=False: B is random too, so the adapter changes the outputs (a trained one would)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                                LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                           task_type="CAUSAL_LM", init_lora_weights=False))
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    return {"base": base_dir, "adapter": adapter_dir}


@pytest.fixture
def champion(tiny: dict, lake: PriceLake, isolated_lake: Path) -> dict:
    """The test's replay lake with pointers as `finpipe run` leaves them: the base model and a promoted adapter."""
    base = {"name": "tiny", "path": str(tiny["base"])}
    registry.write_pointer(registry.base_pointer(isolated_lake), base)
    payload = {"run_id": "r1", "path": str(tiny["adapter"]), "base": base}
    registry.write_pointer(registry.champion_pointer(isolated_lake), payload)
    return payload
