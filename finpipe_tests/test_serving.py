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


class Server:
    def __init__(self, lake_dir: Path, log: Path, *options: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = os.environ | {"FINPIPE_LAKE_DIR": str(lake_dir), "OMP_NUM_THREADS": "1"}
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "finpipe.cli", "serve", "--port", str(self.port),
                                      "--reload-every-s", "0.5", *options],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
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
    client = server.client()
    results, errors = [], []

    def ask(i):
        try:
            question = ["What is AAPL's trend?", "How volatile is MSFT?", "Is IBM overbought?",
                        "How far is GOOG from its 52-week high?"][i % 4]
            reply = client.chat.completions.create(model="champion", max_tokens=10,
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
    health = httpx.get(f"{server.url}/health").json()
    assert health["served"] == 6 and health["batches"] < 6  # some requests shared a batch


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
