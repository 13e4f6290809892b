"""Adapter training for real: a tiny Llama (own tokenizer, built here) through 4-bit layers with TRL."""

import json
from pathlib import Path

import pytest
import torch

from finpipe.instructions.builder import DatasetSpec
from finpipe.training.spec import AdapterSpec
from finpipe_tests.conftest import tiny_split


split = tiny_split


def spec(**changes) -> AdapterSpec:
    base = dict(quantization="nf4", lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=5e-3, max_steps=16,
                batch_size=4, max_seq_len=512, eval_steps=4, early_stopping_patience=0, max_train_samples=160,
                max_val_samples=12, logging_steps=2, warmup_ratio=0.0)
    return AdapterSpec(**(base | changes))


def test_qlora_trains_through_4bit_layers_and_loss_falls(tiny_base, tmp_path, monkeypatch):
    import bitsandbytes as bnb

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # training must write nothing into the working directory (TensorBoard's ./runs)

    from finpipe.training.device import plan_device
    from finpipe.training.sft import load_base, train_adapter

    quantized = load_base(tiny_base, "nf4", plan_device())
    linear4bit = [m for m in quantized.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4bit) == 2 * 7  # q k v o gate up down in each of 2 layers
    del quantized

    report = train_adapter(tiny_base, split().train, split().val, tmp_path / "job", tmp_path / "adapter", spec())
    assert report.steps == 16 and report.quantization == "nf4"
    assert report.best_eval_loss < report.initial_eval_loss - 0.2, (report.initial_eval_loss, report.eval_losses)
    assert report.train_losses[-1][1] < report.train_losses[0][1]
    from transformers import AutoModelForCausalLM

    assert report.total_params == AutoModelForCausalLM.from_pretrained(tiny_base).num_parameters()
    assert 0 < report.trainable_params < report.total_params
    assert report.train_tokens > 0 and report.tokens_per_s > 0 and report.peak_memory_mb > 0
    saved = json.loads((tmp_path / "adapter" / "training_report.json").read_text())
    assert saved["best_eval_loss"] == report.best_eval_loss
    assert list((tmp_path / "adapter" / "tensorboard").rglob("events.out.tfevents.*"))
    assert not any(cwd.iterdir()), list(cwd.rglob("*"))


def test_lora_gradients_are_identical_with_and_without_a_prior_eval_forward(tiny_base):
    """Guards the bitsandbytes CPU repacking bug (0.49/0.50 on AVX512-BF16: wrong grads after eval)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from finpipe.training.device import plan_device
    from finpipe.training.sft import load_base

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = get_peft_model(load_base(tiny_base, "nf4", plan_device()),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                      task_type="CAUSAL_LM", init_lora_weights=False))
    batch = tokenizer([split().train[0].text_of("user")], return_tensors="pt")
    model.train()

    def lora_grads():
        model.zero_grad(set_to_none=True)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    before = lora_grads()
    with torch.no_grad():
        model.eval()
        model(**batch)  # the forward that makes buggy bitsandbytes repack its weights
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    model.train()
    after = lora_grads()
    assert before.keys() == after.keys() and len(before) == 2 * 7 * 2
    assert all(before[n].abs().sum() > 0 for n in before)
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_adapter_reloads_with_plain_peft_and_generates(tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finpipe.training.sft import train_adapter

    train_adapter(tiny_base, split().train, split().val, tmp_path / "job", tmp_path / "adapter",
                  spec(max_steps=4, eval_steps=2))
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    model = PeftModel.from_pretrained(base, adapter)  # nothing finpipe-specific
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    prompt = tokenizer.apply_chat_template(split().val[0].messages[:2], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 8
    assert isinstance(tokenizer.decode(out[0, prompt["input_ids"].shape[1]:]), str)
    # the trained adapter changes the model: logits differ from the base model's
    with torch.no_grad():
        adapted = model(**prompt).logits
        with model.disable_adapter():
            plain = model(**prompt).logits
    assert not torch.allclose(adapted, plain)


class Interrupt(Exception):
    pass


def test_interrupted_training_keeps_the_previous_adapter_and_the_next_run_resumes(tiny_base, tmp_path):
    from transformers import TrainerCallback

    from finpipe.training.sft import train_adapter

    previous = tmp_path / "adapters" / "run-1"
    train_adapter(tiny_base, split().train, split().val, tmp_path / "job-1", previous, spec(max_steps=4, eval_steps=2))
    previous_bytes = {p.name: p.read_bytes() for p in previous.iterdir() if p.is_file()}

    class KillAtStep7(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 7:
                raise Interrupt("injected failure at step 7")

    job, target = tmp_path / "job-2", tmp_path / "adapters" / "run-2"
    with pytest.raises(Interrupt):
        train_adapter(tiny_base, split().train, split().val, job, target, spec(max_steps=12), callbacks=[KillAtStep7()])
    assert not target.exists()  # no half-written adapter
    assert {p.name: p.read_bytes() for p in previous.iterdir() if p.is_file()} == previous_bytes
    assert (job / "checkpoint-4").exists()

    report = train_adapter(tiny_base, split().train, split().val, job, target, spec(max_steps=12))
    assert report.resumed_from and report.resumed_from.endswith("checkpoint-4")
    assert report.steps == 12 and (target / "adapter_model.safetensors").exists()


def test_early_stopping_stops_a_diverging_run_and_restores_the_best_checkpoint(tiny_base, tmp_path):
    from finpipe.training.sft import train_adapter

    report = train_adapter(tiny_base, split().train, split().val, tmp_path / "job", tmp_path / "adapter",
                           spec(learning_rate=5.0, max_steps=40, eval_steps=2, early_stopping_patience=1))
    assert report.stopped_early and report.steps < 40
    evals = [loss for _, loss in report.eval_losses[:-1]]  # the last entry is the final evaluate()
    assert report.best_eval_loss == pytest.approx(min(evals), abs=1e-3)


@pytest.mark.parametrize("changes, message", [
    ({"lora_r": 0}, "lora_r must be > 0, got 0"),
    ({"learning_rate": 0.0}, "learning_rate must be > 0, got 0.0"),
    ({"learning_rate": -1e-4}, "learning_rate must be > 0"),
    ({"quantization": "int3"}, "quantization must be one of"),
])
def test_invalid_training_config_is_a_clear_error(changes, message):
    with pytest.raises(ValueError, match=message):
        spec(**changes)


def test_max_seq_len_below_the_longest_prompt_fails_before_training(tiny_base, tmp_path):
    from finpipe.training.sft import train_adapter

    with pytest.raises(ValueError, match=r"max_seq_len 64 is below the longest prompt template \(\d+ tokens"):
        train_adapter(tiny_base, split().train, split().val, tmp_path / "job", tmp_path / "adapter", spec(max_seq_len=64))
    assert not (tmp_path / "job").exists()
