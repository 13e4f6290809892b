"""The benchmark scripts keep working: each one's --quick mode runs in-process on tiny data (the conftest's isolated
lake has no SmolLM2 and no splits, so the tiny in-process models and the built-in samples are used) and returns and
writes results with the expected keys and positive numbers. The numbers themselves mean nothing at this size."""

import json

MACHINE_KEYS = {"cpu", "cores", "cores_usable", "versions", "load_avg_before", "load_avg_after", "git"}


def run(module, tmp_path, *extra):
    path = tmp_path / f"{module.NAME}.json"
    result = module.main(["--quick", "--json", str(path), *extra])
    written = json.loads(path.read_text())
    assert written["benchmark"] == result["benchmark"] == module.NAME
    assert MACHINE_KEYS <= set(written["machine"]), set(written["machine"])
    assert written["machine"]["versions"]["python"]
    return written


def test_training_throughput_quick(tmp_path, capsys):
    from benchmarks import training_throughput

    result = run(training_throughput, tmp_path, "--no-warmup-run")
    assert "tiny random Llama" in result["config"]["model"]
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == set(training_throughput.VARIANTS)
    for r in rows.values():
        assert r["steps"] == result["config"]["steps"] == 2 and r["timed_steps"] == 1
        assert r["real_tokens"] > 0 and r["tokens_per_s"] > 0 and r["s_per_step"] > 0
        assert r["all_real_tokens"] == r["trl_num_tokens"] > 0
        assert r["peak_mem_mb"] >= 0 and r["trainable_params"] > 0
    assert rows["finpipe_packed"]["pad_fraction"] == 0 < rows["trl_pad_to_max"]["pad_fraction"]
    assert rows["finpipe"]["pad_fraction"] < rows["trl_pad_to_max"]["pad_fraction"]  # batches of similar lengths
    assert rows["finpipe"]["lora"] == rows["trl_default"]["lora"]
    assert result["ratios"]["finpipe_vs_trl_default_tokens_per_s"] > 0
    assert result["checks"]["same_lora_config"] is True
    assert "tokens_per_s" in capsys.readouterr().out  # the table was printed


def test_nightly_increment_quick(tmp_path):
    from benchmarks import nightly_increment

    result = run(nightly_increment, tmp_path)
    assert [r["sessions"] for r in result["rows"]] == [40, 600]
    for r in result["rows"]:
        assert r["lake_rows"] == (r["sessions"] + 1) * r["tickers"]
        for step in nightly_increment.STEPS:
            assert r[f"{step}_s"] > 0, step
        assert r["incremental_max_abs_diff"] < 1e-6
    assert set(result["growth"]) >= {f"{s}_ratio_Nmax_over_Nmin" for s in nightly_increment.STEPS}
    assert all(v > 0 for v in result["growth"].values())


def test_inference_quick(tmp_path):
    from benchmarks import inference

    result = run(inference, tmp_path)
    assert "tiny random Llama" in result["config"]["model"]
    names = [r["variant"] for r in result["rows"]]
    assert names[:2] == ["merged_fp32", "peft_unmerged_fp32"] and "nf4_adapter" in names
    assert any(n.endswith("_static") for n in names) and any(n.endswith("_int8_decode") for n in names)
    for r in result["rows"]:
        assert r["new_tokens"] > 0 and r["tokens_per_s"] > 0 and r["gen_s"] > 0 and r["peak_mem_mb"] >= 0
        assert len(r["texts"]) == result["config"]["prompts"] == 2
    assert result["checks"]["merged_greedy_texts_identical_to_unmerged_at_the_same_precision"] is True
