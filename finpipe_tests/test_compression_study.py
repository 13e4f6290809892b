"""The compression study's domain layer on real parts: Pareto frontiers, layer importance and dropping on a tiny
4-layer Llama, bitsandbytes variants on this CPU, spec validation, and one small end-to-end study."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from finpipe.studies.compression import (
    INT8_CPU_NOTE,
    ROW_KEYS,
    SIZE_DISK,
    SIZE_MEMORY,
    UNSUPPORTED_METHODS,
    CompressionSpec,
    decoder_layers,
    drop_layers,
    in_memory_bytes,
    layer_importance,
    least_important,
    load_variant,
    mark_pareto,
    run_compression_study,
)
from finpipe.studies.pareto import pareto_front, pareto_plot_png

VARIANTS = ["fp32", "bf16", "int8", "nf4", "drop1", "drop1+heal"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The models here are tiny: one intra-op thread is as fast, and immune to the 10-100x slowdowns two OpenMP
    threads suffer at every barrier when another process occupies a core of this shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny4(tiny_base, tmp_path_factory) -> Path:
    """conftest's tiny Llama, 4 layers deep (the session tokenizer; intermediate size a multiple of 32)."""
    from transformers import AutoTokenizer

    from finpipe_tests.helpers import make_tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    return make_tiny_llama(tmp_path_factory.mktemp("tiny4"), tokenizer, num_layers=4)


@pytest.fixture(scope="module")
def split():
    from finpipe.instructions.split import SplitSpec, temporal_split
    from finpipe_tests.helpers import default_samples

    return temporal_split(default_samples(), SplitSpec(val_fraction=0.2))


def _load(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(folder))


def test_pareto_front_marks_exactly_the_non_dominated_points(tmp_path):
    points = [
        {"name": "a", "quality": 0.9, "size": 10},  # best quality
        {"name": "b", "quality": 0.8, "size": 5},
        {"name": "c", "quality": 0.7, "size": 8},  # b is smaller and better
        {"name": "d", "quality": 0.9, "size": 12},  # a: same quality, smaller (ties on one axis still dominate)
        {"name": "e", "quality": 0.5, "size": 2},  # smallest
        {"name": "b2", "quality": 0.8, "size": 5},  # duplicate of b: neither is strictly better
    ]
    assert pareto_front(points, maximize=["quality"], minimize=["size"]) == [True, True, False, False, True, True]
    # a third objective rescues c (fastest) and d (faster than a)
    for p, speed in zip(points, [10, 10, 30, 20, 1, 10]):
        p["speed"] = speed
    assert pareto_front(points, maximize=["quality", "speed"], minimize=["size"]) == [True, True, True, True, True,
                                                                                       True]
    assert pareto_front(points, maximize=["speed"], minimize=[]) == [False, False, True, False, False, False]
    assert pareto_front([], maximize=["quality"], minimize=[]) == []
    with pytest.raises(ValueError, match="at least one objective"):
        pareto_front(points, [], [])
    with pytest.raises(ValueError, match="both maximized and minimized"):
        pareto_front(points, ["size"], ["size"])
    with pytest.raises(ValueError, match="point 1 has no numeric value for objective 'quality'"):
        pareto_front([{"quality": 1.0}, {"quality": None}], ["quality"], [])
    png = pareto_plot_png(points, "size", "quality", "name", tmp_path / "front.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_skipped_variant_is_never_on_a_frontier_and_does_not_hide_the_others():
    rows = [{"variant": "fp32", "size_mb": 4.0, "quality": 0.5, "tokens_per_s": 10.0, "skipped": None},
            {"variant": "int8", "size_mb": None, "quality": None, "tokens_per_s": None,
             "skipped": "RuntimeError: no 8-bit kernel"},
            {"variant": "nf4", "size_mb": 1.0, "quality": 0.4, "tokens_per_s": 5.0, "skipped": None},
            {"variant": "drop1", "size_mb": 3.0, "quality": 0.3, "tokens_per_s": 12.0, "skipped": None}]
    mark_pareto(rows)
    assert [(r["pareto_size"], r["pareto_speed"]) for r in rows] == [(True, True), (False, False), (True, False),
                                                                      (False, True)]


def test_layer_importance_ranks_identity_layers_lowest(tiny4, split):
    import torch

    model, tokenizer = _load(tiny4)
    prompts = [s.messages for s in split.train[:3]]
    before = layer_importance(model, tokenizer, prompts)
    assert len(before) == 4 and all(math.isfinite(s) and s > 1e-3 for s in before)
    with torch.no_grad():
        for i in (1, 3):  # no attention and no MLP contribution: the block's output is its input
            decoder_layers(model)[i].self_attn.o_proj.weight.zero_()
            decoder_layers(model)[i].mlp.down_proj.weight.zero_()
        # a non-uniform final norm: hidden_states[-1] (post-norm) would no longer equal the last layer's output
        model.model.norm.weight.copy_(torch.linspace(0.2, 3.0, model.config.hidden_size))
    scores = layer_importance(model, tokenizer, prompts)
    assert len(scores) == 4 and all(math.isfinite(s) for s in scores)
    assert abs(scores[1]) < 1e-5 and abs(scores[3]) < 1e-5, scores
    assert scores[0] > 1e-3 and scores[2] > 1e-3, scores
    assert least_important(scores, 2) == [1, 3]
    assert scores == layer_importance(model, tokenizer, prompts)  # deterministic


def test_dropped_model_saves_reloads_and_generates_with_the_kv_cache(tiny4, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    original, tokenizer = _load(tiny4)
    ids = tokenizer("AAPL closed at 187.44 on 2024-03-01.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        original_logits = original(ids).logits
    model, _ = _load(tiny4)
    model.config.layer_types = ["full_attention"] * 4  # as newer configs carry: must shrink with the layers
    drop_layers(model, [1, 2])
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert model.config.layer_types == ["full_attention"] * 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    model.save_pretrained(tmp_path / "dropped")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dropped"), dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 2 and len(reloaded.model.layers) == 2
    with torch.no_grad():
        dropped_logits = model(ids).logits
        reloaded_logits = reloaded(ids).logits
    assert torch.allclose(dropped_logits, reloaded_logits, atol=1e-6)
    assert (reloaded_logits - original_logits).abs().max() > 1e-3
    n = 8
    kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        cached = reloaded.generate(ids, use_cache=True, **kwargs)
        uncached = reloaded.generate(ids, use_cache=False, **kwargs)
    assert cached.shape[1] == ids.shape[1] + n
    assert torch.equal(cached, uncached)  # the re-numbered layer_idx address the right cache slots
    with pytest.raises(ValueError, match="at least one must remain"):
        drop_layers(reloaded, [0, 1])
    with pytest.raises(ValueError, match=r"must be in \[0, 2\)"):
        drop_layers(reloaded, [2])


def test_nf4_variant_is_4bit_and_smaller_in_memory(tiny4):
    import bitsandbytes as bnb

    from finpipe.training.sft import count_parameters

    fp32 = load_variant(tiny4, "fp32")
    nf4 = load_variant(tiny4, "nf4")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in nf4.modules()) == 4 * 7  # every projection of 4 layers
    assert count_parameters(nf4) == count_parameters(fp32)  # logical count: Params4bit packs 2 weights per byte
    assert in_memory_bytes(nf4) < 0.6 * in_memory_bytes(fp32)


def test_compression_spec_rejects_bad_values_with_specific_messages(tiny4, split, tmp_path):
    for changes, message in [
        ({"ks": ()}, "ks must list at least one number of layers to drop"),
        ({"ks": (2, 0)}, r"every k in ks must be an integer > 0, got \[2, 0\]"),
        ({"heal_steps": -1}, "heal_steps must be an integer >= 0, got -1"),
        ({"answers": 0}, "answers must be > 0, got 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be > 0, got 0"),
        ({"seed": -3}, "seed must be an integer >= 0, got -3"),
    ]:
        with pytest.raises(ValueError, match=f"invalid compression study config: .*{message}"):
            CompressionSpec(**changes)
    assert CompressionSpec(ks=[3, 1, 3]).ks == (1, 3)  # successive totals: sorted, de-duplicated
    out = tmp_path / "study"
    with pytest.raises(ValueError, match=r"cannot drop 4 of the model's 4 decoder layers: every k must be < 4"):
        run_compression_study(tiny4, split.train, split.val, split.val, out, CompressionSpec(ks=(1, 4)))
    assert not out.exists()  # refused before any work


@pytest.fixture(scope="module")
def study(tiny4, split, tmp_path_factory):
    out = tmp_path_factory.mktemp("compression")
    spec = CompressionSpec(ks=(1,), heal_steps=2, answers=3, max_new_tokens=6, calibration_prompts=4,
                           heal_max_train_samples=16, heal_val_samples=4, seed=0)
    rows = run_compression_study(tiny4, split.train, split.val, split.val, out, spec, log=lambda _: None)
    return rows, out


def test_end_to_end_study_measures_every_variant(study):
    rows, out = study
    assert [r["variant"] for r in rows] == VARIANTS
    by = {r["variant"]: r for r in rows}
    for r in rows:
        assert set(ROW_KEYS) <= set(r), set(ROW_KEYS) - set(r)
        assert r["skipped"] is None, f"{r['variant']} skipped: {r['skipped']} (expected on this stack: {INT8_CPU_NOTE})"
        assert r["size_bytes"] > 0 and r["parameters"] > 0 and r["tokens_per_s"] > 0 and r["latency_s"] > 0
        assert math.isfinite(r["loss"]) and 0.0 <= r["quality"] <= 1.0 and r["format_validity"] is not None
        assert r["peak_rss_increase_mb"] is not None and r["peak_rss_increase_mb"] >= 0
        assert "answers" not in r  # moved to answers.jsonl
    assert {v: by[v]["size_basis"] for v in VARIANTS} == {
        "fp32": SIZE_DISK, "bf16": SIZE_DISK, "int8": SIZE_MEMORY, "nf4": SIZE_MEMORY, "drop1": SIZE_DISK,
        "drop1+heal": SIZE_DISK}
    assert (by["fp32"]["dtype"], by["bf16"]["dtype"], by["int8"]["dtype"], by["nf4"]["dtype"]) == (
        "float32", "bfloat16", "int8", "4bit-nf4")
    assert 1.9 < by["fp32"]["size_bytes"] / by["bf16"]["size_bytes"] < 2.05
    assert by["nf4"]["size_bytes"] < by["int8"]["size_bytes"] < by["fp32"]["size_bytes"]
    assert len({by[v]["parameters"] for v in ("fp32", "bf16", "int8", "nf4")}) == 1  # logical parameter counts
    assert by["drop1"]["layers"] == by["drop1+heal"]["layers"] == 3 and by["fp32"]["layers"] == 4
    assert by["drop1"]["parameters"] < by["fp32"]["parameters"]
    assert by["drop1"]["size_bytes"] < by["fp32"]["size_bytes"]
    assert len(by["drop1"]["dropped_layers"]) == 1 and len(by["drop1"]["layer_importance"]) == 4
    assert by["drop1"]["dropped_layers"] == [min(range(4), key=lambda i: by["drop1"]["layer_importance"][i])]
    assert by["drop1+heal"]["healed"] is True and by["drop1+heal"]["heal_steps"] == 2
    assert by["drop1+heal"]["dropped_layers"] == by["drop1"]["dropped_layers"]
    healed_config = json.loads((Path(by["drop1+heal"]["folder"]) / "config.json").read_text())
    assert healed_config["num_hidden_layers"] == 3


def test_end_to_end_study_marks_pareto_frontiers_and_writes_its_files(study):
    rows, out = study
    size = pareto_front(rows, maximize=["quality"], minimize=["size_mb"])
    speed = pareto_front(rows, maximize=["quality", "tokens_per_s"], minimize=[])
    assert [r["pareto_size"] for r in rows] == size and [r["pareto_speed"] for r in rows] == speed
    # the smallest variant is on the size frontier; on this tiny model (its unquantized embedding is most of it)
    # dropping a bf16 layer saves more than NF4 does, on SmolLM2 NF4 is the smallest (docs/studies.md)
    smallest = min(rows, key=lambda r: r["size_mb"])
    assert smallest["variant"] in {"nf4", "drop1", "drop1+heal"} and smallest["pareto_size"]
    assert max(rows, key=lambda r: r["tokens_per_s"])["pareto_speed"]
    summary = json.loads((out / "study.json").read_text())
    assert [r["variant"] for r in summary["rows"]] == VARIANTS
    assert set(summary["unsupported"]) == {"gptq", "awq"} == set(UNSUPPORTED_METHODS)
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3 * len(VARIANTS) and {a["variant"] for a in answers} == set(VARIANTS)
    for name in ("pareto_size.png", "pareto_speed.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
