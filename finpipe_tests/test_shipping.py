"""GGUF export: a tiny real model and adapter merged, written as GGUF, read back by transformers' GGUF loader (a
reader finpipe did not write), and checked answer for answer; plus the Modelfile, the model card and the CLI."""

import json
from pathlib import Path

import pytest

from finpipe.inference import gguf_export
from finpipe.inference.export import EXPORT_MANIFEST, export_gguf, export_merged
from finpipe.inference.ollama import modelfile
from finpipe.inference.parity import LLAMA_CPP_READER, READER
from finpipe_tests.helpers import default_samples

GOLDEN = 6


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ship") / "gguf"
    golden = [s for s in default_samples() if s.family in ("volatility", "momentum")][:GOLDEN]
    lineage = {"run_id": "r1", "base_name": "tiny", "base_path": str(tiny["base"]), "gates": ["fact_check"]}
    return export_gguf(tiny["base"], tiny["adapter"], out, "finpipe-r1", ("f16", "q8_0"), golden, lineage,
                       log=lambda *_: None)


def test_the_gguf_files_hold_the_model_and_tokenizer_under_llama_cpp_names(exported):
    from gguf import GGUFReader

    f16 = next(f for f in exported.files if f.outtype == "f16")
    reader = GGUFReader(str(f16.path))
    fields = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert "{% generation %}" not in reader.fields["tokenizer.chat_template"].contents()  # training-only markers
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight", "output_norm.weight"} <= names
    assert {t.tensor_type.name for t in reader.tensors if t.name.endswith("attn_q.weight")} == {"F16"}
    q8 = GGUFReader(str(next(f for f in exported.files if f.outtype == "q8_0").path))
    assert {t.tensor_type.name for t in q8.tensors if t.name.endswith("attn_q.weight")} == {"Q8_0"}
    assert {t.tensor_type.name for t in q8.tensors if t.name.endswith("norm.weight")} == {"F32"}


def test_an_f16_export_answers_exactly_like_the_merged_model(exported):
    parity = {p.outtype: p for p in exported.parity if p.reader == READER}
    assert parity["f16"].passed and parity["f16"].identical == parity["f16"].answers == GOLDEN
    q8 = parity["q8_0"]
    assert q8.answers == GOLDEN and 0 <= q8.identical <= GOLDEN and "label correctness" in q8.rule
    saved = json.loads((exported.folder / "parity.json").read_text())
    assert [p["outtype"] for p in saved if p["reader"] == READER] == ["f16", "q8_0"]


def test_llama_cpp_runs_the_exported_files_where_it_is_installed(exported):
    """The engine Ollama users run: each file answered by llama.cpp too (llama-cpp-python is optional: it compiles
    llama.cpp from source, docs/shipping.md)."""
    pytest.importorskip("llama_cpp")
    runs = {p.outtype: p for p in exported.parity if p.reader == LLAMA_CPP_READER}
    assert set(runs) == {"f16", "q8_0"}
    assert all(p.answers == GOLDEN and "within" in p.rule for p in runs.values())
    # a random tiny model answers in byte soup, which the two engines decode differently (invalid UTF-8): text
    # identity is measured on SmolLM2 instead (docs/shipping.md); here each file must load (a pre-tokenizer name
    # llama.cpp does not know fails it) and answer every question


def test_the_parity_check_catches_a_broken_export(tiny, tmp_path, monkeypatch):
    """Without the rotary re-ordering the file loads fine and answers differently: the check must say so."""
    monkeypatch.setattr(gguf_export, "rope_pairs_from_halves", lambda weight, heads: weight)
    golden = [s for s in default_samples() if s.family == "trend"][:GOLDEN]
    broken = export_gguf(tiny["base"], tiny["adapter"], tmp_path / "broken", "broken", ("f32",), golden,
                         log=lambda *_: None)
    assert not broken.passed and broken.parity[0].identical < GOLDEN and broken.parity[0].differing


def test_the_modelfile_and_model_card_carry_the_prompt_format_and_the_lineage(exported):
    text = (exported.folder / "Modelfile").read_text()
    assert "FROM ./finpipe-r1.q8_0.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert "<|im_start|>{{ .Role }}" in text and "You are finpipe" in text and "PARAMETER temperature 0" in text
    card = (exported.folder / "README.md").read_text()
    assert "base_model: tiny" in card and "run `r1`" in card and "fact_check" in card
    assert "| `finpipe-r1.f16.gguf` | transformers GGUF loader |" in card and "Market data for" in card
    manifest = json.loads((exported.folder / EXPORT_MANIFEST).read_text())
    assert manifest["kind"] == "gguf" and manifest["parity_passed"] == all(p.passed for p in exported.parity)
    with pytest.raises(ValueError, match='cannot contain """'):
        modelfile("x.gguf", system_prompt='break """ out')


def test_force_replaces_only_a_previous_finpipe_export(tiny, tmp_path):
    unrelated = tmp_path / "mine"
    unrelated.mkdir()
    (unrelated / "config.json").write_text("{}")  # looks like a model, is not finpipe's
    (unrelated / "NOTES.md").write_text("keep me")
    (unrelated / "checkpoints").mkdir()
    (unrelated / "checkpoints" / "step-100").write_text("a checkpoint of mine")
    with pytest.raises(ValueError, match="not a finpipe export"):
        export_gguf(tiny["base"], tiny["adapter"], unrelated, "x", ("f32",), force=True, log=lambda *_: None)
    with pytest.raises(ValueError, match="not a finpipe export"):  # export --merged DIR --force: the same rule
        export_merged(tiny["base"], tiny["adapter"], unrelated, force=True)
    assert (unrelated / "NOTES.md").read_text() == "keep me" and (unrelated / "config.json").exists()
    assert (unrelated / "checkpoints" / "step-100").read_text() == "a checkpoint of mine"
    with pytest.raises(ValueError, match="GGUF types must be among"):
        export_gguf(tiny["base"], tiny["adapter"], tmp_path / "new", "x", ("q2_k",), log=lambda *_: None)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_force_replaces_exactly_what_the_export_manifest_lists_and_refuses_anything_else(tiny, tmp_path):
    """`export --gguf DIR --force` once deleted a user's NOTES.md and my-benchmarks/ inside a previous export."""
    out = tmp_path / "gguf"
    export_gguf(tiny["base"], tiny["adapter"], out, "x", ("f32",), log=lambda *_: None)
    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    assert manifest["contents"] == sorted(p.name for p in out.iterdir())  # every file written, itself included
    (out / "NOTES.md").write_text("keep me")
    (out / "my-benchmarks").mkdir()
    (out / "my-benchmarks" / "results.csv").write_text("tokens/s\n77.9\n")
    before = _tree(out)
    for export in (lambda: export_gguf(tiny["base"], tiny["adapter"], out, "x", ("f32",), force=True,
                                       log=lambda *_: None),
                   lambda: export_merged(tiny["base"], tiny["adapter"], out, force=True)):
        with pytest.raises(ValueError, match=r"holds what its finpipe export did not write \(NOTES\.md, "
                                             r"my-benchmarks/\).*nothing was deleted"):
            export()
        assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gguf"]  # no temporary folder left either

    (out / "NOTES.md").unlink()
    (out / "my-benchmarks" / "results.csv").unlink()
    (out / "my-benchmarks").rmdir()
    export_merged(tiny["base"], tiny["adapter"], out, force=True)  # a previous export alone: replaced
    assert "x.f32.gguf" not in {p.name for p in out.iterdir()} and (out / "model.safetensors").exists()
    assert json.loads((out / EXPORT_MANIFEST).read_text())["contents"] == sorted(p.name for p in out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gguf"]


def test_a_refused_run_says_so_in_its_model_card_and_no_absolute_path_is_recorded(champion, isolated_lake, tiny,
                                                                                  tmp_path):
    from finpipe.inference.lineage import adapter_lineage
    from finpipe.market.lake import PriceLake
    from finpipe.models.registry import RunRegistry
    from finpipe.paths import LAKE_DB_NAME

    RunRegistry(PriceLake(isolated_lake / LAKE_DB_NAME)).record({
        "run_id": "r1", "created_at": "2026-12-01 10:00:00", "base_model": "tiny", "quantization": "none",
        "config_hash": "x", "adapter_path": "r1", "status": "rejected", "val_cutoff": "2012-06-29",
        "reason": "exact match 0.100 below the champion's 0.500"})
    from finpipe.paths import DatasetFiles

    split = DatasetFiles.of(isolated_lake).split_manifest  # the lake's split has moved on since that run
    split.parent.mkdir(parents=True, exist_ok=True)
    split.write_text(json.dumps({"cutoff": "2013-01-15"}))
    out = tmp_path / "export"
    export_gguf(tiny["base"], tiny["adapter"], out, "finpipe-r1", ("f32",), lineage=adapter_lineage(isolated_lake,
                                                                                                   champion),
                log=lambda *_: None)
    card, manifest = (out / "README.md").read_text(), (out / EXPORT_MANIFEST).read_text()
    assert "**Not promoted: finpipe's promotion refused this run** (exact match 0.100 below the champion's 0.500)" \
        in card
    assert "validation after 2012-06-29" in card and "2013-01-15" not in card  # the run's own split
    for text in (card, manifest):  # this machine's layout stays on this machine
        for local in (tiny["base"], tiny["adapter"], isolated_lake, tmp_path):
            assert str(local) not in text
    assert json.loads(manifest)["status"] == "rejected"


def test_the_ollama_hint_is_shell_quoted(capsys, champion, tmp_path, monkeypatch):
    from finpipe.cli import main
    from finpipe.inference import export

    folder = tmp_path / "my exports; rm -rf ~"

    def exported(*args, **kwargs):  # the export itself is tested above; here only what the command prints
        return export.GgufExport(folder, [], [], {})

    monkeypatch.setattr(export, "export_gguf", exported)
    assert main(["export", "--gguf", str(folder)]) == 0
    assert f"run with: cd '{folder}' && ollama create finpipe -f Modelfile" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_export_gguf_prints_files_and_parity(champion, isolated_lake, tmp_path, capsys):
    from finpipe.cli import main
    from finpipe.instructions.samples import write_jsonl

    write_jsonl([s for s in default_samples() if s.family == "price"][:3], isolated_lake / "datasets/golden.jsonl")
    code = main(["export", "--gguf", str(tmp_path / "out"), "--gguf-types", "f16"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "gguf: " in out and "f16" in out
    assert "parity: finpipe-r1.f16.gguf (transformers GGUF loader): 3/3 answers identical" in out
    assert (tmp_path / "out" / "Modelfile").exists() and Path(tmp_path / "out" / "README.md").exists()


def test_a_terminated_export_removes_its_temporary_folders_and_a_killed_ones_are_removed_by_the_next(
        champion, isolated_lake, tmp_path):
    """SIGTERM (``timeout``, a service manager) ends an export as Ctrl-C does, its hidden temporary folders removed;
    what a SIGKILL leaves behind (it cannot be caught) is removed by the next export of the same folder, and nothing
    without finpipe's marker, or still being written, is touched."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from finpipe.cli import EXIT_INTERRUPTED
    from finpipe.models.files import WRITER_SUFFIX

    out = tmp_path / "exports" / "gguf"
    command = [sys.executable, "-m", "finpipe.cli", "export", "--gguf", str(out), "--gguf-types", "f32,bf16"]

    def hidden() -> list[str]:
        return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) if out.parent.exists() else []

    def export_until_merging(sig: int) -> int:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not any(".merge-" in name for name in hidden()) and process.poll() is None:
            assert time.monotonic() < deadline, "the export never started merging"
            time.sleep(0.02)
        assert process.poll() is None, process.stderr.read()  # caught while it works
        process.send_signal(sig)
        process.communicate(timeout=60)
        return process.returncode

    assert export_until_merging(signal.SIGTERM) == EXIT_INTERRUPTED
    assert hidden() == [] and not out.exists()  # nothing left, nothing half-written

    assert export_until_merging(signal.SIGKILL) == -signal.SIGKILL
    left = hidden()
    assert any(".tmp-" in n for n in left) and any(".merge-" in n for n in left)
    assert all(any(f"{n}{WRITER_SUFFIX}" == m for m in left) for n in left if not n.endswith(WRITER_SUFFIX))
    # beside them: a user's hidden folder with a similar name, and a marker of a writer that still runs
    mine = out.parent / ".gguf.tmp-mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    running = out.parent / ".gguf.tmp-running"
    running.mkdir()
    (out.parent / f".gguf.tmp-running{WRITER_SUFFIX}").write_text(json.dumps({"pid": os.getpid(),
                                                                               "host": os.uname().nodename}))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert hidden() == [".gguf.tmp-mine", ".gguf.tmp-running", f".gguf.tmp-running{WRITER_SUFFIX}"]
    assert (mine / "notes.txt").read_text() == "mine"
