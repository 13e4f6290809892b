"""Every PEFT method through the same training code (``train_adapter``): real trainings of the tiny Llama, no mocks.

lora + none, lora + nf4 (QLoRA), AdaLoRA, VB-LoRA, DoRA and IA3 each train a few steps; the saved adapter reloads
with plain ``PeftModel.from_pretrained`` and is exactly the trained model; adapter sizes order as the methods
promise; AdaLoRA really gives rank back; wrong method knobs are clear errors before any work.
"""

import json
import mmap
import time
from pathlib import Path

import pytest
import torch

from finpipe.training.spec import AdapterSpec
from finpipe_tests.helpers import tiny_split

ADAPTER_FILE = "adapter_model.safetensors"
MODULES = 2 * 7  # q k v o gate up down in each of the tiny model's 2 layers


split = tiny_split


def spec(**changes) -> AdapterSpec:
    # one checkpoint (one evaluation, at the end): the restored "best" model is the trained one
    base = dict(quantization="none", lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=5e-3, max_minutes=0,
                max_steps=6, batch_size=4, max_seq_len=512, eval_points=1, early_stopping_patience=0,
                max_train_samples=160, curve_answers_per_family=0, general_replay_share=0.0,
                max_val_samples=8, logging_steps=1, warmup_ratio=0.0, adalora_init_r=12, adalora_target_r=4,
                vblora_num_vectors=32, vblora_vector_length=16, lora_layer_share=1.0)  # every layer: MODULES
    return AdapterSpec(**(base | changes))


CASES = {  # name: spec changes; lora, dora and vblora share r = 8
    "lora": {"method": "lora"},
    "qlora": {"method": "lora", "quantization": "nf4"},
    "adalora": {"method": "adalora"},
    "vblora": {"method": "vblora"},
    "dora": {"method": "dora"},
    "ia3": {"method": "ia3"},
    "adalora-nf4": {"method": "adalora", "quantization": "nf4"},
    "vblora-nf4": {"method": "vblora", "quantization": "nf4"},
    "dora-nf4": {"method": "dora", "quantization": "nf4"},
}


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    """name -> (spec, report, adapter dir, job dir); each case trains once per module, on first use."""
    from finpipe.training.sft import train_adapter

    done: dict = {}

    def get(name: str):
        if name not in done:
            s = spec(**CASES[name])
            root = tmp_path_factory.mktemp(name)
            report = train_adapter(tiny_base, split().train, split().val, root / "job", root / "adapter", s,
                                   log=lambda *_: None)
            done[name] = (s, report, root / "adapter", root / "job")
        return done[name]

    return get


def _prompt(tokenizer):
    return tokenizer.apply_chat_template(split().val[0].messages[:2], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)


def _logits(tiny_base, adapter: Path | None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))  # nothing finpipe-specific
    with torch.no_grad():
        return model(**_prompt(AutoTokenizer.from_pretrained(tiny_base))).logits


@pytest.mark.parametrize("name", list(CASES))
def test_each_method_trains_saves_and_reloads_with_plain_peft(name, trained, tiny_base):
    s, report, adapter, job = trained(name)
    assert report.method == s.method and report.quantization == s.quantization
    assert report.steps == 6 and report.resumed_from is None
    assert 0 < report.trainable_params < report.total_params
    assert report.best_eval_loss <= report.initial_eval_loss, report.eval_losses
    if s.method in ("lora", "dora"):
        assert report.best_eval_loss < report.initial_eval_loss - 0.1, report.eval_losses
    assert report.peak_rss_delta_mb >= 0 and report.peak_memory_mb > 0
    saved = json.loads((adapter / "training_report.json").read_text())
    assert saved["method"] == s.method and saved["spec"]["method"] == s.method

    config = json.loads((adapter / "adapter_config.json").read_text())
    expected_type = {"lora": "LORA", "dora": "LORA", "adalora": "ADALORA", "vblora": "VBLORA", "ia3": "IA3"}
    assert config["peft_type"] == expected_type[s.method]
    assert config.get("use_dora", False) == (s.method == "dora")

    base = _logits(tiny_base, None)
    adapted = _logits(tiny_base, adapter)
    assert not torch.allclose(adapted, base), "the trained adapter must change the model"
    # the saved adapter (top-k only for VB-LoRA, pruned triplets dropped for AdaLoRA) is exactly the trained
    # model, i.e. the full-size Trainer checkpoint of the last step
    assert torch.allclose(adapted, _logits(tiny_base, job / "checkpoint-6"), atol=1e-5)


def _adapter_bytes(trained, name: str) -> int:
    return (trained(name)[2] / ADAPTER_FILE).stat().st_size


def test_adapter_sizes_order_as_the_methods_promise(trained):
    size = {name: _adapter_bytes(trained, name) for name in ("lora", "qlora", "dora", "adalora", "vblora", "ia3")}
    lora_family = ("lora", "qlora", "dora", "adalora")
    assert all(size["vblora"] < size[name] for name in lora_family), size
    assert size["ia3"] < size["lora"], size
    assert size["lora"] < size["dora"] < 1.2 * size["lora"], size  # + one magnitude vector per module, same r
    assert json.loads((trained("vblora")[2] / "adapter_config.json").read_text())["save_only_topk_weights"] is True


@pytest.mark.parametrize("name", ["adalora", "adalora-nf4"])
def test_adalora_gives_rank_back_to_its_target_budget(name, trained):
    from safetensors.torch import load_file

    s, report, adapter, job = trained(name)
    facts = report.method_facts
    initial = s.adalora_init_r * MODULES
    assert facts["adalora_initial_rank"] == initial
    assert facts["adalora_total_rank"] < initial
    assert facts["adalora_total_rank"] <= s.adalora_target_r * MODULES * 1.1
    history = [rank for _, rank in facts["adalora_rank_history"]]
    assert history and history == sorted(history, reverse=True) and history[0] < initial  # the budget shrank
    # the saved adapter holds exactly the surviving triplets, and its config says which
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sum(sum(v) for v in config["rank_pattern"].values()) == facts["adalora_total_rank"]
    weights = load_file(adapter / ADAPTER_FILE)
    assert sum(t.shape[0] for k, t in weights.items() if "lora_E" in k) == facts["adalora_total_rank"]
    # checkpoints keep full-size matrices (pruned E = 0), so resuming and best-checkpoint reloads fit the model
    checkpoint = load_file(job / "checkpoint-6" / ADAPTER_FILE)
    e = [t for k, t in checkpoint.items() if "lora_E" in k]
    assert sum(t.numel() for t in e) == initial and sum(int((t != 0).sum()) for t in e) == facts["adalora_total_rank"]
    # the orthogonal regularisation is part of the training loss (TRL alone would drop it), not of evaluation
    assert report.train_losses[0][1] > report.initial_eval_loss + 0.5


def test_orthogonal_regularization_matches_peft(tiny_base):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from finpipe.training.peft_methods import build_peft_config, orthogonal_regularization

    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    model = get_peft_model(base, build_peft_config(spec(method="adalora"), base))
    ids = torch.randint(0, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_penalty = model(input_ids=ids, labels=ids).loss  # peft's AdaLoraModel.forward adds it
        plain = model.base_model.model(input_ids=ids, labels=ids).loss
        penalty = orthogonal_regularization(model)
    assert penalty > 0.5 and torch.allclose(with_penalty - plain, penalty, atol=1e-5)


def test_adalora_resumes_inside_its_final_phase_and_keeps_the_allocation(tiny_base, tmp_path):
    from transformers import TrainerCallback

    from finpipe.training.sft import train_adapter

    class Interrupt(Exception):
        pass

    class KillAtStep10(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 10:
                raise Interrupt

    # 12 steps, tfinal 5: the final allocation happens at step 8 (index 7); checkpoint-8 is in the final phase
    s = spec(method="adalora", max_steps=12, eval_points=3, adalora_tfinal_frac=0.4)
    assert s.adalora_schedule() == (1, 5, 1)
    with pytest.raises(Interrupt):
        train_adapter(tiny_base, split().train, split().val, tmp_path / "job", tmp_path / "adapter", s,
                      callbacks=[KillAtStep10()], log=lambda *_: None)
    report = train_adapter(tiny_base, split().train, split().val, tmp_path / "job", tmp_path / "adapter", s,
                           log=lambda *_: None)
    assert report.resumed_from.endswith("checkpoint-8") and report.steps == 12
    assert report.method_facts["adalora_total_rank"] <= s.adalora_target_r * MODULES * 1.1  # masks still applied


def test_ia3_on_a_4bit_base_really_learns_at_a_small_learning_rate(tiny_base, tmp_path):
    """TRL casts QLoRA adapter weights to bf16; IA3 vectors (~1.0) would then never move at lr 2e-4."""
    from safetensors.torch import load_file

    from finpipe.training.sft import train_adapter

    report = train_adapter(tiny_base, split().train, split().val, tmp_path / "job", tmp_path / "adapter",
                           spec(method="ia3", quantization="nf4", learning_rate=2e-4), log=lambda *_: None)
    vectors = load_file(tmp_path / "adapter" / ADAPTER_FILE)
    assert report.method == "ia3" and len(vectors) == MODULES
    assert all((v.float() - 1).abs().max() > 0 for v in vectors.values())


def test_ia3_scales_the_mlp_inputs_and_the_attention_outputs(tiny_base):
    from peft import IA3Config
    from transformers import AutoModelForCausalLM

    from finpipe.training.peft_methods import build_peft_config

    config = build_peft_config(spec(method="ia3"), AutoModelForCausalLM.from_pretrained(tiny_base))
    assert isinstance(config, IA3Config) and len(config.target_modules) == MODULES
    assert {name.rsplit(".", 1)[-1] for name in config.feedforward_modules} == {"gate_proj", "up_proj", "down_proj"}
    assert len(config.feedforward_modules) == 2 * 3 and config.feedforward_modules <= config.target_modules
    only_attention = build_peft_config(spec(method="ia3", target_modules="k_proj,v_proj"),
                                       AutoModelForCausalLM.from_pretrained(tiny_base))
    assert not only_attention.feedforward_modules


def test_the_default_spec_trains_lora_with_quantization_chosen_per_device(tiny_base):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from finpipe.training.peft_methods import build_peft_config

    default = AdapterSpec()
    assert (default.method, default.quantization) == ("lora", "auto")  # QLoRA on CUDA, plain LoRA on CPU
    config = build_peft_config(default, AutoModelForCausalLM.from_pretrained(tiny_base))
    # the top half of the layers (the tiny model has 2): every linear layer there, by leaf name
    expected = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM", bias="none",
                          target_modules=["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
                          layers_to_transform=[1], layers_pattern="layers")
    assert type(config) is LoraConfig and config.to_dict() == expected.to_dict()


def test_lora_on_the_top_layers_only_trains_those_layers(tiny_base, tmp_path):
    from safetensors.torch import load_file

    from finpipe.training.sft import train_adapter

    report = train_adapter(tiny_base, split().train, split().val, tmp_path / "job", tmp_path / "adapter",
                           spec(lora_layer_share=0.5), log=lambda *_: None)
    weights = load_file(tmp_path / "adapter" / ADAPTER_FILE)
    layers = {int(name.split(".layers.")[1].split(".")[0]) for name in weights}
    assert layers == {1} and len(weights) == 2 * 7  # lora_A and lora_B of the 7 linears of the top layer only
    assert all(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)  # trained (B starts at zero)
    assert report.steps == 6
    with pytest.raises(ValueError, match=r"lora_layer_share must be in \(0, 1\], got 0"):
        spec(lora_layer_share=0)


def test_fingerprint_covers_the_method_and_its_knobs():
    prints = {spec().fingerprint(), spec(method="dora").fingerprint(), spec(adalora_init_r=16).fingerprint(),
              spec(vblora_topk=3).fingerprint(), spec(adalora_tfinal_frac=0.3).fingerprint()}
    assert len(prints) == 5


@pytest.mark.parametrize("changes, message", [
    ({"method": "qlora"}, r"method must be one of \('lora', 'adalora', 'vblora', 'dora', 'ia3'\), got 'qlora'"),
    ({"adalora_init_r": 0}, "adalora_init_r must be > 0, got 0"),
    ({"adalora_init_r": 8, "adalora_target_r": 8}, r"adalora_target_r \(8\) must be below adalora_init_r \(8\)"),
    ({"adalora_tinit_frac": 1.0}, r"adalora_tinit_frac must be in \[0, 1\), got 1.0"),
    ({"adalora_tinit_frac": 0.5, "adalora_tfinal_frac": 0.5}, "must be < 1 to leave a budgeting phase"),
    ({"method": "adalora", "max_steps": 4, "adalora_tinit_frac": 0.5, "adalora_tfinal_frac": 0.4},
     r"the AdaLoRA schedule leaves no budgeting phase: max_steps 4 gives tinit 2 and tfinal 2 steps"),
    ({"vblora_num_vectors": 0}, "vblora_num_vectors must be > 0, got 0"),
    ({"vblora_vector_length": -16}, "vblora_vector_length must be > 0, got -16"),
    ({"vblora_num_vectors": 2, "vblora_topk": 4}, r"vblora_topk \(4\) must be <= vblora_num_vectors \(2\)"),
])
def test_invalid_method_knobs_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        spec(**changes)


def test_vblora_vector_length_must_divide_the_model_sizes_checked_before_training(tiny_base, tmp_path):
    from finpipe.training.sft import train_adapter

    # k_proj / v_proj of the tiny model are 64 -> 32 (2 key-value heads of 16)
    with pytest.raises(ValueError, match=r"vblora_vector_length 64 must divide the in and out features of every "
                                         r"targeted module, but 4 of 14 do not \(e.g. model.layers.0.self_attn.k_proj: "
                                         r"in_features 64, out_features 32\); lengths that fit every targeted module: "
                                         r"\[32, 16, 8, 4, 2, 1\]"):
        train_adapter(tiny_base, split().train, split().val, tmp_path / "job", tmp_path / "adapter",
                      spec(method="vblora", vblora_vector_length=64))
    assert not (tmp_path / "job").exists() and not (tmp_path / "adapter").exists()


def test_unknown_target_modules_name_the_models_layers(tiny_base):
    from transformers import AutoModelForCausalLM

    from finpipe.training.peft_methods import build_peft_config

    with pytest.raises(ValueError, match=r"target_modules \['qkv'\] match no linear layer of the model; its linear "
                                         r"layers are named \['down_proj', 'gate_proj', 'k_proj'"):
        build_peft_config(spec(method="ia3", target_modules="q_proj,qkv"),
                          AutoModelForCausalLM.from_pretrained(tiny_base))


def test_rss_sampler_sees_memory_allocated_inside_the_block():
    from finpipe.training.memory import RssPeak

    size = 64 * 2**20
    with RssPeak() as rss:
        # fresh anonymous pages, touched one by one: a malloc'ed block could reuse pages an earlier test freed
        # but left resident, and then RSS would not grow at all
        block = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
        time.sleep(0.3)
        block.close()
    assert rss.delta_mb >= 48, rss.delta_mb  # freed before the block ended: only a sampler running during it sees it
