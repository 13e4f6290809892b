"""Model assets through Dagster: the embedded SmolLM2 base, finpipe's own GPT, and an adapter run."""

import json

import dagster as dg
import pytest

from finpipe.defs.models import base_model, qlora_adapter, scratch_gpt
from finpipe.defs.resources import HuggingFaceResource
from finpipe.models import registry
from finpipe_tests.helpers import derive, ingest


@pytest.fixture
def resources(lake_resources):
    return lake_resources() | {"huggingface": HuggingFaceResource()}


@pytest.mark.slow
def test_scratch_gpt_learns_and_a_qlora_adapter_trains_on_it(resources, isolated_lake):
    ingest(resources)
    assert derive(resources).success
    ops = {
        "scratch_gpt": {"config": {"steps": 60, "hidden_size": 64, "num_layers": 2, "vocab_size": 1500}},
        "base_model": {"config": {"model": "scratch"}},
        "qlora_adapter": {"config": {"max_minutes": 0, "max_steps": 6, "eval_points": 2, "max_val_samples": 8,
                                     "max_train_samples": 64, "quantization": "nf4",  # QLoRA, chosen explicitly on CPU
                                     "batch_size": 2, "learning_rate": 1e-3}},
    }
    # base_model reads whatever base its config names: the own GPT must exist first (its own run)
    pretrained = dg.materialize([scratch_gpt], resources=resources, run_config={"ops": {"scratch_gpt": ops.pop("scratch_gpt")}})
    gpt = {k: v.value for k, v in pretrained.asset_materializations_for_node("scratch_gpt")[0].metadata.items()}
    result = dg.materialize([base_model, qlora_adapter], resources=resources, run_config={"ops": ops})
    # it really learns the corpus: validation perplexity far below the untrained model's (~vocab size)
    assert gpt["val_perplexity_trained"] < gpt["val_perplexity_untrained"] / 10
    adapter = {k: v.value for k, v in result.asset_materializations_for_node("qlora_adapter")[0].metadata.items()}
    assert adapter["quantization"] == "nf4" and adapter["steps"] == 6 and adapter["base_model"] == "finpipe-scratch-gpt"
    assert adapter["best_val_loss"] <= adapter["initial_val_loss"]
    assert adapter["device"] == "cpu" and "QLoRA (4-bit NF4 base)" in adapter["device_note"]
    assert registry.resolve_adapter(isolated_lake, "latest")["path"] == adapter["path"]
    jobs = isolated_lake / "models/adapters/_jobs"  # the finished job's checkpoints are gone; the replay cache stays
    assert not jobs.exists() or {p.name for p in jobs.iterdir()} <= {"general_replay"}


def test_invalid_adapter_config_fails_before_any_work(resources, isolated_lake):
    result = dg.materialize([qlora_adapter], resources=resources, raise_on_error=False,
                            run_config={"ops": {"qlora_adapter": {"config": {"lora_r": 0, "learning_rate": -1.0}}}})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.cause.message
    assert "lora_r must be > 0, got 0" in message and "learning_rate must be > 0, got -1.0" in message


@pytest.mark.slow
def test_embedded_smollm2_becomes_a_plain_hf_folder_that_answers(resources, isolated_lake):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = dg.materialize([base_model], resources=resources)
    meta = {k: v.value for k, v in result.asset_materializations_for_node("base_model")[0].metadata.items()}
    assert meta["name"] == "SmolLM2-135M-Instruct" and meta["layers"] == 30 and meta["vocab_size"] == 49152
    assert meta["chat_template_has_generation_markers"] is True
    folder = meta["path"]
    config = json.loads((isolated_lake / "models/base/SmolLM2-135M-Instruct/config.json").read_text())
    assert "quantization_config" not in config  # plain weights: loads anywhere without gguf_file
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    again = dg.materialize([base_model], resources=resources)  # idempotent: no second conversion
    assert again.success


def test_adapter_run_config_exposes_every_training_knob_with_the_same_defaults():
    import dataclasses

    from finpipe.defs.models import AdapterTrainingConfig
    from finpipe.training.spec import AdapterSpec

    assert AdapterTrainingConfig().model_dump(exclude={"warm_start"}) == dataclasses.asdict(AdapterSpec())
    assert AdapterTrainingConfig().warm_start == "none"  # fresh by default; the nightly schedule warm-starts
