"""``finpipe serve``: a real server process on a free loopback port, driven by the official ``openai`` client and
raw HTTP, on a real lake with a tiny real model (random weights: its answers are nonsense, which is what the
verification must catch). The verifier itself is tested on the grounding's own reference answers."""

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from finpipe.inference.context import LakeFacts, ground, unknown_tickers
from finpipe.models import registry
from finpipe.serving.app import ServeSpec
from finpipe.serving.verify import verify
from finpipe_tests.helpers import free_port

START_TIMEOUT_S = 120


def serve_env(lake_dir: Path) -> dict[str, str]:
    return os.environ | {"FINPIPE_LAKE_DIR": str(lake_dir), "OMP_NUM_THREADS": "1"}


class Server:
    def __init__(self, lake_dir: Path, log: Path, *options: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "finpipe.cli", "serve", "--port", str(self.port),
                                      "--reload-every-s", "0.5", *options],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, env=serve_env(lake_dir))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code in (200, 503):  # 503: up, cannot answer
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"the server did not start: {log.read_text()}")

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def server(champion, isolated_lake, tmp_path):
    running = Server(isolated_lake, tmp_path / "serve.log")
    yield running
    running.stop()


ASK = [{"role": "user", "content": "What is AAPL's trend?"}]


# ---------------------------------------------------------------------------------------- verification


def test_the_verifier_passes_true_answers_and_names_every_false_statement(lake):
    grounding = ground("How volatile is AAPL right now?", LakeFacts(lake))
    assert grounding.family == "volatility" and grounding.reference
    assert verify(grounding.reference, grounding).status == "verified"
    facts, labels = grounding.checks["volatility"]
    wrong = grounding.reference.replace(facts["volatility"], "99.99%")
    verdict = verify(wrong, grounding)
    assert verdict.status == "unverified" and any("99.99" in p for p in verdict.problems)
    other = {"low": "high", "medium": "low", "high": "low"}[labels["risk"]]
    mislabelled_answer = re.sub(rf"\b{labels['risk']}\b", other, grounding.reference)
    assert mislabelled_answer != grounding.reference
    mislabelled = verify(mislabelled_answer, grounding)
    assert mislabelled.status == "unverified" and any("risk" in p for p in mislabelled.problems)
    assert verify("I like turtles.", grounding).problems == ["the answer states none of the market data's facts"]
    assert verify("anything", ground("What is the weather?", LakeFacts(lake))).status == "ungrounded"
    union = ground("How volatile is AAPL, and is it overbought?", LakeFacts(lake))  # each family's facts are checked
    assert len(union.checks) > 1 and verify(grounding.reference, union).status == "verified"


def test_unknown_ticker_words_are_named():
    assert unknown_tickers("What is TSLA's trend vs AAPL?", ["AAPL", "MSFT"]) == ["TSLA"]
    assert unknown_tickers("Is the RSI of $NVDA high?", ["AAPL"]) == ["NVDA"]


def test_serve_settings_are_validated_before_anything_loads():
    with pytest.raises(ValueError, match="on_unverified must be one of"):
        ServeSpec(on_unverified="pray")
    with pytest.raises(ValueError, match="port must be in 1..65535"):
        ServeSpec(port=99999)


def test_serve_settings_refuse_nan_and_inf():
    for name in ("generation_timeout_s", "reload_every_s"):
        for bad in (float("nan"), float("inf")):  # inf passed "> 0": a generation bound that never ends
            with pytest.raises(ValueError, match=f"{name} must be a finite number"):
                ServeSpec(**{name: bad})


# ---------------------------------------------------------------------------------------- the real server


@pytest.mark.slow
def test_the_openai_client_lists_models_and_gets_grounded_verified_answers(server, champion):
    client = server.client()
    models = {m.id for m in client.models.list().data}
    assert {"champion", "base", champion["run_id"]} <= models

    raw = client.chat.completions.with_raw_response.create(model="champion", messages=ASK, max_tokens=16)
    reply = raw.parse()
    assert reply.model == champion["run_id"] and reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str) and reply.usage.completion_tokens > 0
    finpipe = reply.model_extra["finpipe"]
    assert finpipe["grounding"]["tickers"] == ["AAPL"] and finpipe["grounding"]["family"] == "trend"
    assert finpipe["verdict"] in ("verified", "unverified") and raw.headers["x-finpipe-verdict"] == finpipe["verdict"]
    assert reply.choices[0].finish_reason in ("stop", "length")

    base = client.chat.completions.create(model="base", messages=ASK, max_tokens=8)
    assert base.model == "base"

    chunks = list(client.chat.completions.create(model="champion", messages=ASK, max_tokens=12, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and text.strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].model_extra["finpipe"]["verdict"] in ("verified", "unverified")
    # greedy: the streamed answer is the plain answer
    plain = client.chat.completions.create(model="champion", messages=ASK, max_tokens=12)
    assert text.strip() == plain.choices[0].message.content

    # "serving on" only once the champion is loaded, with its engine and the precision decided once; a line a request
    log = server.log.read_text()
    assert log.index(f"loaded {champion['run_id']}") < log.index("serving on http://")
    health = httpx.get(f"{server.url}/health").json()
    assert health["engine"] == "torch" and health["precision"] and health["torch_precision"] in log
    assert re.search(rf"POST /v1/chat/completions champion {champion['run_id']}: \d+\+\d+ tokens, [\d.]+ s "
                     r"\(generation [\d.]+ s, [\d.]+ tokens/s\), (verified|unverified)", log), log
    assert plain.model_extra["finpipe"]["timing"]["generation_s"] > 0


@pytest.mark.slow
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    import openai

    client = server.client()
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-run", messages=ASK)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="exceeds this server's limit"):
        client.chat.completions.create(model="champion", messages=ASK, max_tokens=100000)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="champion", messages=[])
    cases = [
        (b"{not json", 400, "invalid_json"),
        (json.dumps({"model": "champion", "messages": ASK, "temperature": float("nan")}).encode(), 400, "invalid_value"),
        (json.dumps({"model": "champion", "messages": [{"role": "user", "content": "   "}]}).encode(), 400,
         "invalid_value"),
        (json.dumps({"model": "champion", "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400,
         "invalid_value"),
        (json.dumps({"model": "champion", "messages": ASK, "pad": "x" * 70000}).encode(), 413, "request_too_large"),
    ]
    for body, status, code in cases:
        response = httpx.post(f"{server.url}/v1/chat/completions", content=body,
                              headers={"content-type": "application/json"}, timeout=30)
        assert response.status_code == status, (body[:60], response.text)
        assert response.json()["error"]["code"] == code and response.json()["error"]["message"]
    long_question = "Is AAPL trending? " + "really " * 3000  # past the model's context
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="champion", messages=[{"role": "user", "content": long_question}])
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


@pytest.mark.slow
def test_questions_without_market_data_are_refused_without_calling_the_model(server):
    client = server.client()
    reply = client.chat.completions.create(model="champion", messages=[
        {"role": "user", "content": "What is TSLA's trend?"}])
    assert "no market data for TSLA" in reply.choices[0].message.content
    assert "AAPL, GOOG, IBM, MSFT" in reply.choices[0].message.content
    assert reply.model_extra["finpipe"]["verdict"] == "refused" and reply.usage.completion_tokens == 0
    assert httpx.get(f"{server.url}/health").json()["served"] == 0  # the model never ran


@pytest.mark.slow
def test_concurrent_requests_are_queued_batched_and_all_answered(server):
    """Six clients at once on each engine, all answered; the champion, on the lean decoder, one request at a time (a
    lean step for one beats a batched step shared by four)."""
    client = server.client()

    def ask_all(model: str) -> dict:
        results, errors = [], []
        before = httpx.get(f"{server.url}/health").json()

        def ask(i):
            try:
                question = ["What is AAPL's trend?", "How volatile is MSFT?", "Is IBM overbought?",
                            "How far is GOOG from its 52-week high?"][i % 4]
                reply = client.chat.completions.create(model=model, max_tokens=10,
                                                       messages=[{"role": "user", "content": question}])
                results.append(reply.choices[0].message.content)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors and len(results) == 6
        after = httpx.get(f"{server.url}/health").json()
        return {"served": after["served"] - before["served"], "batches": after["batches"] - before["batches"]}

    base = ask_all("base")  # how many share a batch depends on arrival times: test_queued_plain_requests_... says
    assert base["served"] == 6
    assert httpx.get(f"{server.url}/health").json()["decoder"] == "lean"
    champion = ask_all("champion")
    assert champion == {"served": 6, "batches": 6}


@pytest.mark.slow
def test_a_new_champion_is_served_without_a_restart_and_in_flight_requests_finish(server, champion, tiny,
                                                                                   isolated_lake, tmp_path):
    import shutil

    client = server.client()
    assert client.chat.completions.create(model="champion", messages=ASK, max_tokens=4).model == champion["run_id"]
    adapters = registry.adapters_dir(isolated_lake)
    shutil.copytree(tiny["adapter"], adapters / "r2")
    stream = client.chat.completions.create(model="champion", messages=ASK, max_tokens=40, stream=True)
    first = next(iter(stream))  # a request in flight on the old champion ...
    registry.write_pointer(registry.champion_pointer(isolated_lake), champion | {"run_id": "r2",
                                                                                "path": str(adapters / "r2")})
    rest = list(stream)  # ... finishes on it
    assert first.model == champion["run_id"] and rest[-1].choices[0].finish_reason in ("stop", "length")
    deadline = time.monotonic() + 60
    while httpx.get(f"{server.url}/health").json()["champion"] != "r2":
        assert time.monotonic() < deadline, server.log.read_text()
        time.sleep(0.3)
    assert client.chat.completions.create(model="champion", messages=ASK, max_tokens=4).model == "r2"
    assert server.proc.poll() is None


@pytest.mark.slow
def test_abstain_replaces_an_unverified_answer_and_says_why(champion, isolated_lake, tmp_path):
    running = Server(isolated_lake, tmp_path / "abstain.log", "--on-unverified", "abstain")
    try:
        reply = running.client().chat.completions.create(model="champion", messages=ASK, max_tokens=16)
        finpipe = reply.model_extra["finpipe"]
        if finpipe["verdict"] == "unverified":  # a random model's answer: all but certain
            assert reply.choices[0].message.content.startswith("I cannot state this reliably")
            assert finpipe["problems"]
    finally:
        running.stop()


# ---------------------------------------------------------------------------------------- red team: serving faults


def wait_for_health(server: Server, ok, timeout_s: float = 30.0) -> httpx.Response:
    """The first /health response ``ok`` accepts (its JSON), within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = httpx.get(f"{server.url}/health", timeout=30)
        if ok(response.json()):
            return response
        assert time.monotonic() < deadline, (response.json(), server.log.read_text())
        time.sleep(0.3)


def said(health: dict, words: str) -> bool:
    return any(words in reason for reason in health["degraded"])


@pytest.mark.slow
def test_a_champion_pointer_or_lake_broken_after_the_start_keeps_the_champion_serving_and_says_so(server, champion,
                                                                                                 isolated_lake):
    from finpipe.paths import LAKE_DB_NAME

    client = server.client()
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["degraded"] == [] and health["can_answer"]

    def answered_degraded(words: str) -> None:
        reply = client.chat.completions.create(model="champion", messages=ASK, max_tokens=4)
        finpipe = reply.model_extra["finpipe"]
        assert reply.model == champion["run_id"] and finpipe["grounding"]["tickers"] == ["AAPL"]
        assert any(words in reason for reason in finpipe["degraded"]), finpipe["degraded"]

    pointer = registry.champion_pointer(isolated_lake)
    good = pointer.read_text()
    registry.write_pointer(pointer, champion | {"run_id": "r9", "path": str(registry.adapters_dir(isolated_lake) / "r9")})
    response = wait_for_health(server, lambda h: said(h, "r9"))  # a pointer naming a folder that is not there
    assert response.status_code == 200 and response.json()["status"] == "degraded"
    assert not response.json()["champion_pointer_ok"] and response.json()["champion"] == champion["run_id"]
    answered_degraded("r9")
    pointer.write_text(good[: len(good) // 2])  # cut off mid-write
    wait_for_health(server, lambda h: said(h, "not a finpipe pointer"))
    answered_degraded("not a finpipe pointer")
    pointer.write_text(good)
    wait_for_health(server, lambda h: h["status"] == "ok")

    db = isolated_lake / LAKE_DB_NAME
    aside = db.with_name("aside.duckdb")
    db.rename(aside)  # the lake file gone: the facts read last keep answering
    response = wait_for_health(server, lambda h: said(h, "missing"))
    assert response.status_code == 200 and not response.json()["lake_readable"]
    answered_degraded("missing")
    db.write_bytes(b"this is not a duckdb file " * 4000)  # a damaged lake in its place
    wait_for_health(server, lambda h: said(h, "not a readable DuckDB lake"))
    answered_degraded("not a readable DuckDB lake")
    db.unlink()
    aside.rename(db)
    health = wait_for_health(server, lambda h: h["status"] == "ok").json()
    assert health["lake_readable"] and health["champion_pointer_ok"] and health["champion"] == champion["run_id"]
    assert server.proc.poll() is None


@pytest.mark.slow
def test_a_server_started_on_a_missing_champion_folder_serves_the_base_says_why_and_503_only_when_nothing_can_answer(
        champion, tiny, isolated_lake, tmp_path):
    import shutil

    import openai

    gone = tmp_path / "gone-adapter"
    registry.write_pointer(registry.champion_pointer(isolated_lake), champion | {"path": str(gone)})
    running = Server(isolated_lake, tmp_path / "serve.log")  # it starts (it used to exit at startup)
    try:
        client = running.client()
        response = httpx.get(f"{running.url}/health")
        assert response.status_code == 200 and response.json()["status"] == "degraded"
        assert response.json()["can_answer"] and said(response.json(), str(gone))
        with pytest.raises(openai.InternalServerError) as unavailable:
            client.chat.completions.create(model="champion", messages=ASK, max_tokens=4)
        assert unavailable.value.status_code == 503 and unavailable.value.body["code"] == "model_unavailable"
        assert str(gone) in unavailable.value.body["message"]

        base_pointer = registry.base_pointer(isolated_lake)
        good_base = base_pointer.read_text()
        registry.write_pointer(base_pointer, {"name": "tiny", "path": str(tmp_path / "no-base")})
        response = httpx.get(f"{running.url}/health")  # no champion, no base: nothing can answer
        assert response.status_code == 503 and not response.json()["can_answer"], response.text
        with pytest.raises(openai.InternalServerError, match="no-base"):
            client.chat.completions.create(model="base", messages=ASK, max_tokens=4)
        base_pointer.write_text(good_base)
        reply = client.chat.completions.create(model="base", messages=ASK, max_tokens=4)
        assert reply.model == "base" and said(reply.model_extra["finpipe"], str(gone))

        shutil.copytree(tiny["adapter"], gone)  # the folder arrives: the champion is served without a restart
        health = wait_for_health(running, lambda h: h["champion"] == champion["run_id"]).json()
        assert health["status"] == "ok" and health["degraded"] == []
        assert client.chat.completions.create(model="champion", messages=ASK, max_tokens=4).model == champion["run_id"]
    finally:
        running.stop()


@pytest.mark.slow
def test_openai_options_it_cannot_honour_are_refused_naming_them_and_stop_and_seed_are_honoured(server):
    url = f"{server.url}/v1/chat/completions"
    refused = [({"response_format": {"type": "json_object"}}, "response_format"),
               ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
                 "tool_choice": "required"}, "tools"),
               ({"tool_choice": "required"}, "tool_choice"),
               ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
               ({"logprobs": True}, "logprobs"), ({"top_logprobs": 3}, "top_logprobs"), ({"n": 2}, "n"),
               ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop"), ({"seed": -1}, "seed")]
    for extra, param in refused:
        response = httpx.post(url, json={"model": "champion", "messages": ASK, "max_tokens": 4, **extra}, timeout=60)
        assert response.status_code == 400, (extra, response.text)
        assert response.json()["error"]["param"] == param and response.json()["error"]["message"], response.text
    for method, path, status in (("GET", "/no-such-path", 404), ("GET", "/v1/chat/completions", 405),
                                 ("DELETE", "/health", 405)):
        response = httpx.request(method, f"{server.url}{path}", timeout=30)
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"} and response.json()["error"]["message"]
    deep = b'{"model": "champion", "messages": ' + b"[" * 30000 + b"]" * 30000 + b"}"  # under the body limit
    response = httpx.post(url, content=deep, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json", response.text

    client = server.client()
    plain = client.chat.completions.create(model="champion", messages=ASK, max_tokens=24).choices[0].message.content
    assert len(plain) >= 8, plain
    stop = plain[len(plain) // 2: len(plain) // 2 + 2]
    expected = plain[: plain.index(stop)].strip()
    reply = client.chat.completions.create(model="champion", messages=ASK, max_tokens=24, stop=["\u2603never", stop])
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="champion", messages=ASK, max_tokens=24, stop=stop,
                                                 stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert stop not in streamed and streamed.strip() == expected and chunks[-1].choices[0].finish_reason == "stop"

    sampled = dict(model="champion", messages=ASK, max_tokens=16, temperature=1.0)
    first = client.chat.completions.create(seed=7, **sampled).choices[0].message.content
    assert client.chat.completions.create(seed=7, **sampled).choices[0].message.content == first
    streamed = "".join(c.choices[0].delta.content or ""
                       for c in client.chat.completions.create(seed=7, stream=True, **sampled))
    assert streamed.strip() == first
    others = {client.chat.completions.create(seed=seed, **sampled).choices[0].message.content for seed in (8, 9)}
    assert others != {first}  # the seed does choose the sample
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


@pytest.mark.slow
def test_a_stream_whose_client_leaves_stops_generating_and_a_refused_request_loads_no_model(server, champion):
    url = f"{server.url}/v1/chat/completions"
    for body in ({"model": "base", "messages": ASK, "max_tokens": 100000},
                 {"model": "base", "messages": [{"role": "user", "content": "Is AAPL trending? " + "really " * 3000}]}):
        response = httpx.post(url, json=body, timeout=60)
        assert response.status_code == 400, response.text
    assert httpx.get(f"{server.url}/health").json()["models_loaded"] == [champion["run_id"]]  # base never loaded

    with httpx.stream("POST", url, json={"model": "champion", "messages": ASK, "max_tokens": 512, "stream": True},
                      timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break  # the first words: the client leaves
    health = wait_for_health(server, lambda h: h["cancelled"] == 1 and h["generating"] == 0, timeout_s=20).json()
    assert health["waiting"] == 0
    started = time.monotonic()
    reply = server.client().chat.completions.create(model="champion", messages=ASK, max_tokens=4)
    assert reply.choices[0].message.content is not None and time.monotonic() - started < 20
    stopped = re.search(r"stopped a generation after (\d+) tokens", server.log.read_text())
    whole = server.client().chat.completions.create(model="champion", messages=ASK, max_tokens=512)  # greedy: the same
    assert stopped and int(stopped.group(1)) < whole.usage.completion_tokens, server.log.read_text()


@pytest.mark.slow
def test_a_public_host_gets_one_warning_and_a_busy_port_exits_5_with_one_line(champion, isolated_lake, tmp_path):
    running = Server(isolated_lake, tmp_path / "public.log", "--host", "0.0.0.0")
    try:
        warnings = [line for line in running.log.read_text().splitlines() if line.startswith("finpipe serve: warning")]
        assert len(warnings) == 1 and "0.0.0.0" in warnings[0] and "no authentication" in warnings[0], warnings
        second = subprocess.run([sys.executable, "-m", "finpipe.cli", "serve", "--port", str(running.port)],
                                env=serve_env(isolated_lake), capture_output=True, text=True, timeout=120)
        assert second.returncode == 5, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "already in use" in lines[0] and str(running.port) in lines[0], lines
        assert httpx.get(f"{running.url}/health").json()["status"] == "ok"  # the first one is untouched
    finally:
        running.stop()


@pytest.mark.slow
def test_ask_uses_a_running_server_of_the_same_lake_and_champion_and_gives_the_same_text(capsys, champion,
                                                                                          isolated_lake, tmp_path):
    from finpipe_tests.helpers import cli

    running = Server(isolated_lake, tmp_path / "ask.log", "--decode-weights", "full")
    try:
        question = "How volatile is Apple?"
        common = ("--max-new-tokens", "12", "--decode-weights", "full")
        code, served, err = cli(capsys, "ask", question, *common, "--server", running.url)
        assert code == 0 and f"answered by the server at {running.url}" in err, err
        assert "(market data as of 2013-03-01)" in err and "loading" not in err  # no model loaded here
        code, local, err = cli(capsys, "ask", question, *common, "--server", "off")
        assert code == 0 and "loading champion r1" in err
        assert served == local and served.strip()
        # another policy than the server's: answered here, not by the server
        code, _, err = cli(capsys, "ask", question, *common, "--server", running.url, "--on-unverified", "abstain")
        assert code == 0 and "answered by the server" not in err
        # a refusal comes back as the same one-line error
        code, out, err = cli(capsys, "ask", "What is AAPL's P/E?", "--server", running.url)
        assert code == 2 and out == "" and "does not cover valuation ratios" in err
    finally:
        running.stop()


def test_engine_call_runs_loads_on_the_generation_thread_and_hands_back_errors():
    """Model loads run where generations run (``Engine.call``): one thread computes, so OpenMP keeps one team."""
    from finpipe.serving.engine import Engine

    engine = Engine(log=lambda _: None)
    try:
        assert engine.call(lambda: threading.current_thread().name) == "generation-worker"

        def fails():
            raise ValueError("a corrupt adapter")

        with pytest.raises(ValueError, match="a corrupt adapter"):
            engine.call(fails)
        assert engine.call(lambda: 42) == 42  # the worker survived the failure
    finally:
        assert engine.stop(5.0)
    with pytest.raises(RuntimeError, match="stopping"):
        engine.call(lambda: 1)


def test_the_champion_runs_on_the_lean_decoder_and_a_folder_finpipe_did_not_write_is_left_alone(champion,
                                                                                                isolated_lake):
    """On a CPU the champion is merged once (as `ask` does) and decoded by the lean decoder; a folder of the user's
    where the merged one would go is never replaced: the champion then runs on transformers."""
    from finpipe.evaluation.generation import DecodeSpec
    from finpipe.models.merged import STAMP, merged_root
    from finpipe.serving.models import ModelStore

    user_folder = merged_root(isolated_lake) / champion["run_id"]
    user_folder.mkdir(parents=True)
    (user_folder / "my-notes.txt").write_text("mine")
    lines: list[str] = []
    store = ModelStore(isolated_lake, decode=DecodeSpec(), log=lines.append)
    assert store.check_champion()
    assert store.champion_model().decoder == "transformers"
    assert (user_folder / "my-notes.txt").read_text() == "mine" and not (user_folder / STAMP).exists()
    assert any(line.startswith(f"not merging {champion['run_id']}:") for line in lines), lines

    (user_folder / "my-notes.txt").unlink()
    user_folder.rmdir()
    fresh = ModelStore(isolated_lake, decode=DecodeSpec(), log=lines.append)
    assert fresh.check_champion()
    loaded = fresh.champion_model()
    assert loaded.decoder == "lean" and (user_folder / STAMP).exists()
    assert loaded.context_length == loaded.model.context


def test_queued_plain_requests_share_a_batch_on_transformers(champion, isolated_lake):
    """Requests that queue while the worker is busy are generated together (transformers: the base model)."""
    from finpipe.evaluation.generation import DecodeSpec, Sampling
    from finpipe.serving.engine import Engine, Job
    from finpipe.serving.models import ModelStore

    engine = Engine(log=lambda _: None)
    store = ModelStore(isolated_lake, log=lambda _: None, decode=DecodeSpec(), compute=engine.call)
    try:
        base = store.get("base")
        assert base.decoder == "transformers"
        busy, release = threading.Event(), threading.Event()

        def hold():  # the worker is inside this call while the requests queue
            busy.set()
            release.wait(60)

        holder = threading.Thread(target=engine.call, args=(hold,))
        holder.start()
        assert busy.wait(60)
        questions = ["What is AAPL's trend?", "How volatile is MSFT?", "Is IBM overbought?"] * 2
        futures = [engine.submit(Job(base, [{"role": "user", "content": q}], Sampling(max_new_tokens=4)))
                   for q in questions]
        release.set()
        answers = [f.result(timeout=300) for f in futures]
        holder.join(60)
        assert len(answers) == 6 and engine.served == 6 and engine.batches == 1
    finally:
        engine.stop(5.0)
