"""Adapter training for real: a tiny Llama (own tokenizer, built here) through 4-bit layers with TRL."""

import json
import re

import pytest
import torch

from finpipe.training.spec import AdapterSpec
from finpipe_tests.helpers import tiny_split

split = tiny_split


def spec(**changes) -> AdapterSpec:
    base = dict(quantization="nf4", lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=5e-3, max_minutes=0,
                max_steps=16, batch_size=4, max_seq_len=512, eval_points=4, early_stopping_patience=0,
                max_train_samples=160, max_val_samples=12, logging_steps=2, warmup_ratio=0.0,
                curve_answers_per_family=0, general_replay_share=0.0)
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
                  spec(max_steps=4, eval_points=2))
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
    train_adapter(tiny_base, split().train, split().val, tmp_path / "job-1", previous, spec(max_steps=4, eval_points=2))
    previous_bytes = {p.name: p.read_bytes() for p in previous.iterdir() if p.is_file()}

    class KillAtStep7(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 7:
                raise Interrupt("injected failure at step 7")

    job, target = tmp_path / "job-2", tmp_path / "adapters" / "run-2"
    with pytest.raises(Interrupt):
        train_adapter(tiny_base, split().train, split().val, job, target, spec(max_steps=12, eval_points=3),
                      callbacks=[KillAtStep7()])
    assert not target.exists()  # no half-written adapter
    assert {p.name: p.read_bytes() for p in previous.iterdir() if p.is_file()} == previous_bytes
    assert (job / "checkpoint-4").exists()

    report = train_adapter(tiny_base, split().train, split().val, job, target, spec(max_steps=12, eval_points=3))
    assert report.resumed_from and report.resumed_from.endswith("checkpoint-4")
    assert report.steps == 12 and (target / "adapter_model.safetensors").exists()


def test_early_stopping_stops_a_diverging_run_and_restores_the_best_checkpoint(tiny_base, tmp_path):
    from finpipe.training.sft import train_adapter

    report = train_adapter(tiny_base, split().train, split().val, tmp_path / "job", tmp_path / "adapter",
                           spec(learning_rate=20.0, max_steps=40, eval_points=20, early_stopping_patience=1))
    assert report.stopped_early and report.steps < 40
    # the best checkpoint's: step 0 (the untrained adapter, evaluated first) has none, and a run at this rate may
    # never get below it
    evals = [loss for step, loss in report.eval_losses if step > 0]
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


# ------------------------------------------------------------------------------ the budget, the plan, the loss

def test_the_learning_rate_follows_the_budget_s_progress():
    from finpipe.training.budget import lr_factor

    assert lr_factor(0.0, 0.1) == pytest.approx(0.02) and lr_factor(0.05, 0.1) == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1) == pytest.approx(1.0) and lr_factor(1.0, 0.1) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0.55, 0.1) == pytest.approx(0.5)  # cosine: half way through the decay
    assert lr_factor(0.55, 0.1, "linear") == pytest.approx(0.5) and lr_factor(0.9, 0.0, "linear") == pytest.approx(0.1)
    assert lr_factor(0.99, 0.1, "constant") == 1.0
    assert lr_factor(2.0, 0.1) == pytest.approx(0.0, abs=1e-12)  # past the budget: no learning rate left


def test_a_time_budget_stops_training_and_an_interrupted_run_continues_its_clock(tiny_base, tmp_path):
    from transformers import TrainerCallback

    from finpipe.training.budget import CLOCK_FILE
    from finpipe.training.sft import train_adapter

    budget = spec(max_minutes=0.15, max_steps=0, max_epochs=0, eval_points=3, warmup_ratio=0.1,
                  max_train_samples=0, batch_size=2)
    started = __import__("time").perf_counter()
    lines: list[str] = []
    report = train_adapter(tiny_base, split().train, split().val, tmp_path / "job", tmp_path / "adapter", budget,
                           log=lines.append)
    assert report.stopped_by == "time" and report.steps > 3
    # progress: a line at each tenth of the budget (no flood), with the step, tokens and the time left
    progress = [line for line in lines if line.startswith("training: ") and "of the budget" in line]
    assert 5 <= len(progress) <= 10 and len(progress) < report.steps, progress
    assert re.fullmatch(r"training: \d+% of the budget \(step \d+, [\d,]+ tokens, about \d+\.\d min left\)", progress[0])
    assert 9 <= report.seconds <= 9 + 8, report.seconds  # the 9 s budget, plus at most the last step and evaluation
    assert __import__("time").perf_counter() - started < 60
    assert len(report.eval_losses) == 1 + 3  # before training, then at each third of the budget

    class SlowEvaluation(TrainerCallback):
        def on_evaluate(self, args, state, control, **kwargs):
            __import__("time").sleep(3)

    # evaluations are not charged to the budget: 3 x 3 s of slow evaluation, the same 9 s of training steps
    slow = train_adapter(tiny_base, split().train, split().val, tmp_path / "job-slow", tmp_path / "adapter-slow",
                         budget, callbacks=[SlowEvaluation()])
    assert slow.stopped_by == "time" and slow.seconds >= 9 + 3 * 3 - 1, slow.seconds
    assert slow.steps >= 0.6 * report.steps, (slow.steps, report.steps)

    class StopAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_save = True  # a checkpoint (and the clock) at step 3, then an interruption
            if state.global_step == 4:
                raise Interrupt("stop")

    job = tmp_path / "job-2"
    with pytest.raises(Interrupt):
        train_adapter(tiny_base, split().train, split().val, job, tmp_path / "adapter-2", budget,
                      callbacks=[StopAtStep3()])
    spent = json.loads((job / CLOCK_FILE).read_text())["elapsed_s"]
    assert spent > 0
    resumed = train_adapter(tiny_base, split().train, split().val, job, tmp_path / "adapter-2", budget)
    assert resumed.resumed_from.endswith("checkpoint-3") and resumed.stopped_by == "time"
    assert resumed.seconds <= 9 - spent + 8  # the rest of the budget, not a new one


def test_the_learning_curve_scores_validation_answers_strictly_at_each_evaluation(tiny_base, tmp_path):
    from finpipe.training.sft import train_adapter

    report = train_adapter(tiny_base, split().train, split().val, tmp_path / "job", tmp_path / "adapter",
                           spec(max_steps=6, eval_points=2, curve_answers_per_family=1))
    assert [p["step"] for p in report.curve] == [0, 3, 6]
    assert report.curve[0]["tokens"] == 0 < report.curve[1]["tokens"] < report.curve[2]["tokens"] == report.train_tokens
    for point in report.curve:
        assert set(point) >= {"val_loss", "number_correctness", "label_correctness", "exact_match", "format_validity"}
        assert 0 <= point["number_correctness"] <= 1
    saved = json.loads((tmp_path / "adapter" / "training_report.json").read_text())
    assert saved["curve"] == report.curve and saved["cumulative_train_tokens"] == report.train_tokens


def test_the_device_plan_says_what_trains_and_why():
    from finpipe.training.device import plan_device

    class Shape:
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads = 576, 1536, 30, 9

    cpu = plan_device("auto", "auto", Shape(), tokens_per_batch=8 * 256, seq_len=256, prefer_cpu=True)
    assert cpu.device == "cpu" and cpu.quantization == "none" and "LoRA on CPU" in cpu.facts["quantization_reason"]
    assert cpu.gradient_checkpointing is False and "off (memory allows" in cpu.facts["gradient_checkpointing_reason"]
    huge = plan_device("auto", "auto", Shape(), tokens_per_batch=10**8, seq_len=4096, prefer_cpu=True)
    assert huge.gradient_checkpointing is True and "on (memory needs it)" in huge.facts["gradient_checkpointing_reason"]
    forced = plan_device("nf4", "off", Shape(), prefer_cpu=True)
    assert forced.quantization == "nf4" and forced.gradient_checkpointing is False
    assert "QLoRA" in forced.note and forced.facts["quantization_reason"] == "set: nf4"
    assert set(cpu.as_dict()) >= {"device", "precision", "quantization", "attention", "gradient_checkpointing", "cpu"}
    assert cpu.facts["precision_reason"]  # measured (or no native bf16): the plan says which


def test_cpu_precision_is_chosen_by_measured_speed_not_by_a_flag(monkeypatch):
    """A CPU with AVX512-BF16 but no AMX computed bf16 slower than fp32 (0.73x, 2026-12-01): the plan follows the
    measurement (or FINPIPE_CPU_BF16), never the flag alone."""
    from finpipe import runtime
    from finpipe.training.device import plan_device

    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)
    for speedup, dtype in ((0.73, "float32"), (1.05, "float32"), (1.8, "bfloat16")):
        monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda s=speedup: s)
        monkeypatch.setattr(runtime, "onednn_bf16_isa", lambda: "avx512_core_bf16")
        plan = plan_device("auto", "off", prefer_cpu=True)
        assert plan.compute_dtype == dtype and plan.bf16 == (dtype == "bfloat16"), (speedup, plan)
        assert f"{speedup}x the speed of fp32" in plan.facts["precision_reason"]
        assert str(runtime.inference_dtype("cpu")) == f"torch.{dtype}"
    monkeypatch.setenv("FINPIPE_CPU_BF16", "1")
    assert plan_device("auto", "off", prefer_cpu=True).compute_dtype == "bfloat16"
    monkeypatch.setenv("FINPIPE_CPU_BF16", "0")
    assert plan_device("auto", "off", prefer_cpu=True).compute_dtype == "float32"
    monkeypatch.delenv("FINPIPE_CPU_BF16")
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: False)
    plan = plan_device("auto", "off", prefer_cpu=True)
    assert plan.compute_dtype == "float32" and plan.facts["precision_reason"] == "no native bf16 on this CPU: fp32"


def test_the_answer_loss_equals_the_causal_lm_loss_on_answer_tokens(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finpipe.training.sft import answer_loss

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_base), AutoTokenizer.from_pretrained(tiny_base)
    sample = split().train[0]
    prompt = tokenizer.apply_chat_template(sample.messages[:-1], add_generation_prompt=True, tokenize=True)
    full = tokenizer.apply_chat_template(sample.messages, tokenize=True)
    prompt, full = list(getattr(prompt, "input_ids", prompt)), list(getattr(full, "input_ids", full))
    ids = torch.tensor([full])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100
    with torch.no_grad():
        expected = model(input_ids=ids, labels=labels).loss
        ours = answer_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
