"""The chat page of ``finpipe serve`` and its Host allowlist: the per-number verdict and the grounding it shows, the
page's routes on an app, and the page itself in a real browser (playwright driving Debian's chromium-headless-shell)
against a real server on a free loopback port with the tiny model. Select the browser test with ``-m browser``."""

import json
import os
import re
import shutil
from urllib.parse import urlsplit

import httpx
import pytest

from finpipe.inference.context import LakeFacts, ground
from finpipe.serving.verify import CHECKED, UNCHECKED, WRONG, grounding_as_dict, verify
from finpipe.serving.web import EXAMPLES_PATH, HostAllowlist, allowed_hosts, host_allowed, host_name, mount_web
from finpipe_tests.test_serving import Server

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ANSWER_TIMEOUT_MS = 120_000


# ---------------------------------------------------------------------------------------- what the page shows


def test_the_verdict_marks_each_number_with_its_span_and_the_fact(lake):
    grounding = ground("How volatile is AAPL right now?", LakeFacts(lake))
    facts, _ = grounding.checks["volatility"]
    verdict = verify(grounding.reference, grounding)
    numbers = verdict.as_dict()["numbers"]
    assert numbers and all(n["status"] == CHECKED for n in numbers)
    assert all(grounding.reference[n["start"]:n["end"]] == n["text"] for n in numbers)
    volatility = next(n for n in numbers if n["text"] == facts["volatility"])
    assert "AAPL" in volatility["fact"] and facts["volatility"] in volatility["fact"]

    wrong_answer = grounding.reference.replace(facts["volatility"], "99.99%") + f" As of {grounding.as_of} it rose 7.77%."
    wrong = verify(wrong_answer, grounding)
    by_text = {n.text: n for n in wrong.numbers}
    assert wrong.status == "unverified" and by_text["99.99%"].status == WRONG
    assert facts["volatility"] in by_text["99.99%"].fact  # what the number should have been
    assert by_text["7.77%"].status == WRONG and by_text["7.77%"].problem in wrong.problems
    assert by_text[grounding.as_of].status == CHECKED  # the data's date, one entry (not its digits)
    assert [n.span for n in wrong.numbers] == sorted(n.span for n in wrong.numbers)

    ungrounded = verify("It is 42.", ground("What is the weather?", LakeFacts(lake)))
    assert ungrounded.status == "ungrounded" and [(n.text, n.status) for n in ungrounded.numbers] == [("42", UNCHECKED)]


def test_the_grounding_carries_the_context_lines_the_model_was_given(lake):
    grounding = ground("What is the trend for IBM relative to its moving averages?", LakeFacts(lake))
    shown = grounding_as_dict(grounding)
    assert shown["tickers"] == ["IBM"] and shown["as_of"] == grounding.as_of and shown["context"] == grounding.context
    assert shown["lines"] and all(f"- {label}: {value}" in grounding.context for label, value in shown["lines"])
    assert json.loads(json.dumps(shown)) == shown
    assert grounding_as_dict(ground("What is the weather?", LakeFacts(lake)))["lines"] == []


def test_host_names_are_read_and_allowed_as_configured():
    assert host_name("LocalHost:8000") == "localhost" and host_name("[::1]:8000") == "::1"
    assert host_name("127.0.0.1") == "127.0.0.1" and host_name("localhost.:80") == "localhost"
    for bad in ("", "evil.example:99999", "a b", "[::1", "localhost:80:80", "user@localhost"):
        assert host_name(bad) is None, bad
    loopback = allowed_hosts()
    for good in ("localhost", "localhost:8000", "127.0.0.1:1", "[::1]:8000", "LOCALHOST"):
        assert host_allowed(good, loopback), good
    for forged in ("evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io", "", None):
        assert not host_allowed(forged, loopback), forged
    assert host_allowed("finpipe.example.com:443", allowed_hosts("finpipe.example.com"))
    assert host_allowed("10.0.0.5:8000", allowed_hosts("", listen_host="10.0.0.5"))
    assert not host_allowed("10.0.0.5:8000", allowed_hosts("", listen_host="0.0.0.0"))
    assert host_allowed("anything.example", allowed_hosts("*"))
    with pytest.raises(ValueError, match="not a host name"):
        allowed_hosts("good.example, bad/name")


def test_the_page_routes_and_the_host_allowlist_on_an_app(lake):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    app.add_middleware(HostAllowlist, allowed=allowed_hosts())
    mount_web(app, lambda: LakeFacts(lake))
    client = TestClient(app, base_url="http://127.0.0.1:8000")
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    # everything the page loads comes from /static on this server: no other host, no inline script
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(a.startswith("/static/") or a.startswith("data:") for a in assets)
    script = client.get("/static/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    for name in ("api.js", "render.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200, name
    for missing in ("/static/nope.js", "/static/..%2Fweb.py", "/static/index.html"):
        assert client.get(missing).status_code == 404, missing
    examples = client.get(EXAMPLES_PATH).json()
    assert [t["ticker"] for t in examples["tickers"]] == ["AAPL", "GOOG", "IBM", "MSFT"]
    assert {e["family"] for e in examples["examples"]} >= {"volatility", "comparison"} and examples["as_of"]
    forged = client.get("/", headers={"host": "evil.example"})
    assert forged.status_code == 403 and forged.json()["error"]["code"] == "host_not_allowed"


# ---------------------------------------------------------------------------------------- a real browser


def _unavailable(reason: str):
    """CI installs the browser and sets FINPIPE_REQUIRE_BROWSER=1: a missing one fails there instead of skipping."""
    if os.environ.get("FINPIPE_REQUIRE_BROWSER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    executable = os.environ.get("FINPIPE_CHROMIUM") or shutil.which("chromium-headless-shell")
    if not executable:
        _unavailable("chromium-headless-shell is not installed (Debian: apt-get install chromium-headless-shell; "
                     "`playwright install` downloads browsers, which this test does not rely on)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def _canned_stream(answer: str, finpipe: dict) -> str:
    """A streamed answer as the server sends it (the verdict in the last chunk), for the page to render."""
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
              *({"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
                for word in re.findall(r"\S+\s*", answer)),
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "finpipe": finpipe}]
    return "".join(f"data: {json.dumps(c | {'model': 'r1'})}\n\n" for c in chunks) + "data: [DONE]\n\n"


@pytest.mark.slow
@pytest.mark.browser
def test_the_chat_page_in_a_real_browser(browser, champion, lake, isolated_lake, tmp_path):
    from playwright.sync_api import expect

    # a verdict the real verifier gives a half-wrong answer, for the rendering of checked and wrong numbers
    grounding = ground("How volatile is IBM right now?", LakeFacts(lake))
    true_value = grounding.checks["volatility"][0]["volatility"]
    half_wrong = grounding.reference.replace(true_value, "55.55%")
    verdict = verify(half_wrong, grounding)
    canned = verdict.as_dict() | {"grounding": grounding_as_dict(grounding), "model": "r1", "degraded": []}

    server = Server(isolated_lake, tmp_path / "serve.log")
    try:
        origin = urlsplit(server.url).netloc
        context = browser.new_context(viewport={"width": 1100, "height": 900})
        page = context.new_page()
        foreign, requested, failures = [], [], []

        def only_this_server(route):  # nothing may leave the machine: any other host fails the test
            if urlsplit(route.request.url).netloc == origin:
                route.continue_()
            else:
                foreign.append(route.request.url)
                route.abort()

        page.route("**/*", only_this_server)
        page.on("request", lambda r: requested.append(r.url))
        page.on("pageerror", lambda exc: failures.append(str(exc)))
        page.goto(f"{server.url}/")

        # the model picker (the champion's run is "champion"), the lake's tickers, example questions per family
        expect(page.locator("#model option")).to_have_text(["champion (r1)", "base"])
        expect(page.locator("#tickers .chip")).to_have_text(["AAPL", "GOOG", "IBM", "MSFT"])
        expect(page.locator("#status")).to_contain_text("market data as of 2013-03-01")

        # a question: the answer streamed piece by piece, its verdict, the facts it was grounded in
        page.fill("#question", "What is AAPL's trend?")
        page.click("#send")
        first = page.locator(".turn").nth(0)
        answer = first.locator(".answer")
        expect(answer).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
        assert int(answer.get_attribute("data-chunks")) > 1  # rendered as the tokens arrived
        said = answer.get_attribute("data-verdict")
        assert said in ("verified", "unverified")
        expect(answer.locator(".badge")).to_have_text(said)
        assert answer.locator(".text").inner_text().strip()
        facts = first.locator("details.facts")
        expect(facts).to_contain_text("AAPL")
        expect(facts).to_contain_text("as of 2013-03-01")
        expect(facts.locator("dt").first).to_be_visible()  # the context lines the model was given
        expect(facts).to_contain_text("SMA")
        facts.locator("summary").click()  # collapsible
        expect(facts.locator("dl")).to_be_hidden()

        # compare mode: base and champion answer the same question side by side (the example for MSFT's volatility)
        page.get_by_role("button", name="MSFT", exact=True).click()
        page.get_by_role("button", name="volatility", exact=True).click()
        expect(page.locator("#question")).to_have_value("How volatile is MSFT right now?")
        page.check("#compare")
        page.click("#send")
        pair = page.locator(".turn").nth(1).locator(".answer")
        expect(pair).to_have_count(2)
        expect(pair.locator("h3")).to_have_text(["base", "champion (r1)"])
        for i in range(2):
            expect(pair.nth(i)).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
            expect(pair.nth(i).locator(".badge")).to_have_text(re.compile("^(verified|unverified)$"))
        page.uncheck("#compare")

        # a question the lake cannot answer: refused, with why, and no model asked
        page.fill("#question", "What is AAPL's P/E ratio?")
        page.click("#send")
        refused = page.locator(".turn").nth(2).locator(".answer")
        expect(refused).to_have_attribute("data-verdict", "refused", timeout=ANSWER_TIMEOUT_MS)
        expect(refused.locator(".text")).to_contain_text("does not cover valuation ratios")
        expect(refused.locator(".badge")).to_have_text("refused")

        # server errors read as sentences: an unknown model (404), a question past the context (400), a full queue
        page.evaluate("""() => { const o = document.createElement('option'); o.value = o.textContent = 'no-such-run';
                                 document.getElementById('model').append(o); }""")
        page.select_option("#model", "no-such-run")
        page.fill("#question", "How volatile is AAPL right now?")
        page.click("#send")
        unknown = page.locator(".turn").nth(3).locator(".answer")
        expect(unknown).to_have_attribute("data-state", "error", timeout=ANSWER_TIMEOUT_MS)
        expect(unknown.locator(".error")).to_contain_text("Unknown model")
        expect(unknown.locator(".error")).to_contain_text("no-such-run")
        page.select_option("#model", "champion")
        page.fill("#question", "Is AAPL trending? " + "really " * 3000)
        page.click("#send")
        too_long = page.locator(".turn").nth(4).locator(".answer")
        expect(too_long.locator(".error")).to_contain_text("too long", timeout=ANSWER_TIMEOUT_MS)
        busy = {"error": {"message": "the queue is full (32 waiting): try again shortly", "type": "server_error",
                          "param": None, "code": "server_busy"}}
        page.route("**/v1/chat/completions", lambda route: route.fulfill(status=503, json=busy), times=1)
        page.fill("#question", "How volatile is AAPL right now?")
        page.click("#send")
        expect(page.locator(".turn").nth(5).locator(".error")).to_contain_text("The server is busy")

        # each number marked as checked or wrong, with the fact (a real verdict of a half-wrong answer)
        page.route("**/v1/chat/completions", lambda route: route.fulfill(
            status=200, headers={"content-type": "text/event-stream"}, body=_canned_stream(half_wrong, canned)),
            times=1)
        page.fill("#question", "How volatile is IBM right now?")
        page.click("#send")
        marked = page.locator(".turn").nth(6).locator(".answer")
        expect(marked).to_have_attribute("data-verdict", "unverified", timeout=ANSWER_TIMEOUT_MS)
        expect(marked.locator(".text mark.num.wrong")).to_have_text(["55.55%"])
        expect(marked.locator(".text mark.num.wrong")).to_have_attribute("title", re.compile(re.escape(true_value)))
        assert marked.locator(".text mark.num.checked").count() >= 1
        expect(marked.locator(".problems")).to_contain_text("55.55")
        expect(marked.locator("details.numbers li.wrong")).to_contain_text(true_value)  # the fact, also on a phone

        # readable on a phone-sized window: nothing wider than the screen
        page.set_viewport_size({"width": 1100, "height": page.evaluate("document.documentElement.scrollHeight")})
        page.screenshot(path=str(tmp_path / "finpipe-page.png"))  # the whole page, the sticky question box at its end
        page.set_viewport_size({"width": 390, "height": 844})
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        page.screenshot(path=str(tmp_path / "finpipe-page-phone.png"))
        assert (tmp_path / "finpipe-page.png").stat().st_size > 10_000
        assert (tmp_path / "finpipe-page-phone.png").stat().st_size > 10_000

        assert not foreign, foreign
        assert requested and all(urlsplit(u).netloc == origin for u in requested), requested
        assert not failures, failures
        context.close()

        # a forged Host (a DNS-rebinding page) is refused before any route; the loopback names are answered
        for path in ("/", "/v1/models", "/health"):
            forged = httpx.get(f"{server.url}{path}", headers={"Host": "evil.example"}, timeout=10)
            assert forged.status_code == 403 and forged.json()["error"]["code"] == "host_not_allowed", path
        chat = httpx.post(f"{server.url}/v1/chat/completions", headers={"Host": f"evil.example:{server.port}"},
                          json={"model": "champion", "messages": [{"role": "user", "content": "AAPL trend?"}]}, timeout=10)
        assert chat.status_code == 403
        assert httpx.get(f"{server.url}/", headers={"Host": f"localhost:{server.port}"}, timeout=10).status_code == 200
        assert "refused a request with Host 'evil.example'" in server.log.read_text()
    finally:
        server.stop()
