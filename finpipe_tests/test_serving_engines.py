"""``finpipe serve``'s engines: the champion's GGUF export recorded in the lake and checked by hash, the engine chosen
(auto, torch, llama.cpp) with one-line errors where llama.cpp cannot run, and a real ``finpipe serve --engine
llama.cpp`` on loopback answering a tiny exported model through the same grounding, verification and streaming as
PyTorch (skipped where llama-cpp-python is not installed: it compiles llama.cpp from source, docs/shipping.md)."""

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from finpipe.inference import exported
from finpipe.inference.export import EXPORT_MANIFEST
from finpipe.models import registry
from finpipe.serving import gguf_engine
from finpipe.serving.engine_choice import champion_candidates
from finpipe_tests.helpers import free_port
from finpipe_tests.test_serving import ASK, Server


@dataclass
class FakeFile:  # a GgufFile as export_gguf returns it
    path: Path
    outtype: str


def test_an_export_is_recorded_in_the_lake_and_a_changed_file_is_refused(isolated_lake, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    for outtype in ("bf16", "q8_0"):
        (folder / f"m.{outtype}.gguf").write_bytes(outtype.encode() * 1000)
    record = exported.record_export(isolated_lake, "r1", [FakeFile(folder / "m.bf16.gguf", "bf16"),
                                                          FakeFile(folder / "m.q8_0.gguf", "q8_0")])
    assert record.outtype == "q8_0" and record.path == (folder / "m.q8_0.gguf").resolve()  # what the Modelfile ships
    assert exported.recorded_export(isolated_lake, "r1") == record
    assert exported.recorded_export(isolated_lake, "r2") is None
    exported.check_hash(record)
    (folder / "m.q8_0.gguf").write_bytes(b"tampered" * 1000)
    with pytest.raises(ValueError, match="does not match the SHA-256 its export recorded"):
        exported.check_hash(record)
    (folder / "m.q8_0.gguf").unlink()
    with pytest.raises(FileNotFoundError, match="finpipe export --gguf DIR"):
        exported.recorded_export(isolated_lake, "r1")
    (folder / EXPORT_MANIFEST).write_text(json.dumps({"run_id": "r0"}))
    with pytest.raises(ValueError, match="is an export of run r0, but the champion is r1"):
        exported.given_gguf(folder / "m.bf16.gguf", isolated_lake, "r1")


def test_without_llama_cpp_python_auto_serves_torch_and_an_explicit_engine_is_one_line(monkeypatch, champion,
                                                                                        isolated_lake, capsys):
    """Simulated at the import edge only: ``import llama_cpp`` fails as it does where the package is absent."""
    from finpipe.cli import main

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert not gguf_engine.available()
    with pytest.raises(gguf_engine.LlamaCppMissing, match="pip install llama-cpp-python"):
        gguf_engine._llama_cpp()
    assert champion_candidates(isolated_lake, "auto", None, "r1") == ([None], None)  # PyTorch, nothing to say
    assert main(["serve", "--engine", "llama.cpp", "--port", str(free_port())]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "pip install llama-cpp-python" in lines[0], lines


def test_llama_cpp_without_an_export_names_the_export_command(monkeypatch, champion, isolated_lake, capsys, tmp_path):
    from finpipe.cli import main

    monkeypatch.setattr(gguf_engine, "available", lambda: True)
    candidates, note = champion_candidates(isolated_lake, "auto", None, "r1")
    assert candidates == [None] and "has no GGUF export" in note and "finpipe export --gguf DIR" in note
    assert main(["serve", "--engine", "llama.cpp", "--port", str(free_port())]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "finpipe export --gguf DIR" in lines[0], lines
    assert main(["serve", "--engine", "torch", "--gguf", str(tmp_path / "x.gguf")]) == 2
    assert "cannot be combined with engine 'torch'" in capsys.readouterr().err
    assert main(["serve", "--gguf", str(tmp_path / "missing.gguf"), "--port", str(free_port())]) == 2
    assert "no such file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- a real llama.cpp server


def export(capsys, adapter: str, folder: Path) -> None:
    from finpipe.cli import main

    assert main(["export", "--gguf", str(folder), "--gguf-types", "q8_0", "--adapter", adapter]) == 0
    assert "recorded for `finpipe serve`" in capsys.readouterr().out


@pytest.mark.slow
def test_serve_runs_the_champions_gguf_on_llama_cpp_and_follows_a_new_champion(capsys, champion, tiny, isolated_lake,
                                                                               tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional: it compiles llama.cpp "
                        "from source, docs/shipping.md)")
    export(capsys, "champion", tmp_path / "gguf-r1")
    running = Server(isolated_lake, tmp_path / "serve.log", "--engine", "llama.cpp")
    try:
        health = httpx.get(f"{running.url}/health").json()
        assert health["status"] == "ok" and health["engine"] == "llama.cpp" and health["precision"] == "q8_0"
        assert health["gguf"] == str((tmp_path / "gguf-r1" / "finpipe-r1.q8_0.gguf").resolve())
        log = running.log.read_text()
        assert log.index("loaded r1") < log.index("serving on") and "champion r1 on llama.cpp, q8_0" in log

        client = running.client()
        reply = client.chat.completions.create(model="champion", messages=ASK, max_tokens=12)
        finpipe = reply.model_extra["finpipe"]
        assert reply.model == "r1" and isinstance(reply.choices[0].message.content, str)
        assert 0 < reply.usage.completion_tokens <= 12 and reply.choices[0].finish_reason in ("stop", "length")
        assert finpipe["grounding"]["tickers"] == ["AAPL"] and finpipe["verdict"] in ("verified", "unverified")
        assert finpipe["timing"]["generation_s"] > 0
        again = client.chat.completions.create(model="champion", messages=ASK, max_tokens=12)
        assert again.choices[0].message.content == reply.choices[0].message.content  # greedy: the same answer

        plain = reply.choices[0].message.content
        stop = plain[3:5]
        if len(plain) > 5 and stop.strip() and "\ufffd" not in stop:  # a stop string ends it where it occurs
            cut = client.chat.completions.create(model="champion", messages=ASK, max_tokens=12, stop=[stop])
            assert cut.choices[0].message.content == plain[:plain.index(stop)].strip()
            assert cut.choices[0].finish_reason == "stop"

        chunks = list(client.chat.completions.create(model="champion", messages=ASK, max_tokens=12, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason
        assert chunks[-1].model_extra["finpipe"]["verdict"] in ("verified", "unverified")
        assert text.strip() == reply.choices[0].message.content  # the stream is the plain answer

        assert client.chat.completions.create(model="base", messages=ASK, max_tokens=4).model == "base"  # on torch
        assert "POST /v1/chat/completions champion r1: " in running.log.read_text()

        # a new champion without an export: --engine llama.cpp keeps r1 serving and says why, until it is exported
        adapters = registry.adapters_dir(isolated_lake)
        shutil.copytree(tiny["adapter"], adapters / "r2")
        registry.write_pointer(registry.champion_pointer(isolated_lake),
                               champion | {"run_id": "r2", "path": str(adapters / "r2")})
        deadline = time.monotonic() + 60
        while not any("has no GGUF export" in p for p in httpx.get(f"{running.url}/health").json()["degraded"]):
            assert time.monotonic() < deadline, running.log.read_text()
            time.sleep(0.3)
        assert client.chat.completions.create(model="champion", messages=ASK, max_tokens=4).model == "r1"
        export(capsys, str(adapters / "r2"), tmp_path / "gguf-r2")
        while (health := httpx.get(f"{running.url}/health").json())["champion"] != "r2":
            assert time.monotonic() < deadline + 60, running.log.read_text()
            time.sleep(0.3)
        assert health["engine"] == "llama.cpp" and health["status"] == "ok" and "gguf-r2" in health["gguf"]
        assert client.chat.completions.create(model="champion", messages=ASK, max_tokens=4).model == "r2"
    finally:
        running.stop()
