"""The chat page of ``finpipe serve``, and the Host-header allowlist that keeps it (and the API) on loopback.

The page is static HTML, CSS and JavaScript modules shipped in ``finpipe/serving/web/``: no build step, nothing
fetched from another host (its Content-Security-Policy tells the browser so). It asks the server's own
OpenAI-compatible endpoint, streamed, and shows beside each answer its verdict, each number as checked or wrong
(``Verdict.numbers``) and the facts the model was given (``finpipe.grounding``); ``GET /v1/finpipe/examples``
gives it the lake's tickers and one example question per family.

A page on a local port is reachable through DNS rebinding: a site the user visits points its own name at
127.0.0.1, and its scripts then talk to the server as if same-origin. The browser still sends that site's name as
``Host``, so the server answers only the Host names it is told (``HostAllowlist``; loopback names by default).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Callable, Iterable

WEB_DIR = Path(__file__).with_name("web")
EXAMPLES_PATH = "/v1/finpipe/examples"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".js": "text/javascript; charset=utf-8"}
# the browser enforces what the tests check: scripts, styles and requests from this server only, no framing
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_ANY_ADDRESS = ("", "0.0.0.0", "::")
# a Host header: a name or an IPv4 address, or an IPv6 address in brackets, then an optional port
_HOST = re.compile(r"(?:\[(?P<v6>[0-9a-z:.%]+)\]|(?P<name>[a-z0-9._~-]+))(?::(?P<port>\d{1,5}))?")
_NAME = re.compile(r"\*|[a-z0-9._~-]+|[0-9a-z:.%]+")


def _normal(name: str) -> str:
    """A host name as compared: lower-case, without brackets or the trailing dot of a fully qualified name."""
    return name.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")


def host_name(header: str) -> str | None:
    """The host of a Host header without its port ('LocalHost:8000' -> 'localhost', '[::1]:8000' -> '::1'); None
    when it is not a host."""
    match = _HOST.fullmatch(header.strip().lower())
    if match is None or (match["port"] and not 0 < int(match["port"]) < 65536):
        return None
    return _normal(match["v6"] or match["name"])


def host_allowed(host_header: str | None, allowed: Iterable[str]) -> bool:
    """Whether a request with this Host header is answered: its host is in ``allowed`` (any port), or ``allowed``
    holds '*'. A missing or malformed header is refused."""
    allowed = {_normal(a) for a in allowed}
    name = host_name(host_header or "")
    return name is not None and ("*" in allowed or name in allowed)


def allowed_hosts(setting: str = "", listen_host: str = "127.0.0.1") -> tuple[str, ...]:
    """The Host names a server answers: the loopback names, the address it listens on when that is one address
    (a client using it is no rebinding page), and ``setting``'s comma-separated names ('*': any). Raises ValueError
    naming an entry that is not a host name."""
    extra = [_normal(n) for n in setting.split(",") if n.strip()]
    bad = [n for n in extra if not _NAME.fullmatch(n)]
    if bad:
        raise ValueError(f"allowed_hosts: {bad[0]!r} is not a host name (a comma-separated list of names such as "
                         "'finpipe.example.com', or '*')")
    own = [] if listen_host.strip() in _ANY_ADDRESS else [_normal(listen_host)]
    return tuple(dict.fromkeys([*LOOPBACK_HOSTS, *own, *extra]))


class HostAllowlist:
    """ASGI middleware: a request whose Host is not allowed gets 403 and OpenAI's error JSON before any route runs.
    (Starlette's TrustedHostMiddleware answers 400 in plain text and reads '[::1]:8000' as '['.) A refused host is
    logged once, so an operator behind a proxy sees which name to allow."""

    def __init__(self, app, allowed: Iterable[str] = LOOPBACK_HOSTS, log: Callable[[str], None] | None = None):
        self.app = app
        self.allowed = tuple(dict.fromkeys(_normal(a) for a in allowed))
        self.log = log
        self._logged: set[str] = set()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        hosts = [value.decode("latin-1") for key, value in scope.get("headers", ()) if key == b"host"]
        if len(hosts) == 1 and host_allowed(hosts[0], self.allowed):
            await self.app(scope, receive, send)
            return
        shown = hosts[0][:100] if hosts else ""
        if self.log is not None and shown not in self._logged and len(self._logged) < 20:
            self._logged.add(shown)
            self.log(f"refused a request with Host {shown!r}: not an allowed host name ({', '.join(self.allowed)}); "
                     "--allowed-hosts adds names")
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps(host_refusal(shown, self.allowed)).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def host_refusal(host: str, allowed: Iterable[str]) -> dict:
    from finpipe.serving.protocol import ApiError

    shown = ", ".join(f"[{a}]" if ":" in a else a for a in allowed)
    return ApiError(403, f"this server does not answer requests for the host {host!r} (it answers {shown}): a page "
                    "that reaches it under another name may be a DNS rebinding attack; start it with "
                    "--allowed-hosts NAME to add a name", param="Host", code="host_not_allowed").body()


def examples(facts) -> dict:
    """What the page suggests: the lake's tickers (with the names people call them), the newest date of its data,
    and one question per family (``finpipe.inference.context.DEMO_QUESTIONS``, as templates and filled in)."""
    from finpipe.inference.context import DEMO_QUESTIONS, common_name, demo_questions

    tickers = facts.tickers()
    names = facts.names()
    dates = [row["as_of"] for row in (facts.latest(t) for t in tickers) if row]
    return {"tickers": [{"ticker": t, "name": common_name(t, names)} for t in tickers],
            "as_of": max(dates, default=None),
            "families": [{"family": family, "template": template} for family, template in DEMO_QUESTIONS],
            "examples": [{"family": family, "question": question}
                         for family, question in (demo_questions(tickers) if tickers else [])]}


def page_file(name: str) -> Path | None:
    """The page's file of that name, None when there is none (only plain files of the folder, never a path)."""
    path = WEB_DIR / name
    return path if "/" not in name and "\\" not in name and path.suffix in MEDIA_TYPES and path.is_file() else None


def mount_web(app, facts: Callable[[], object]) -> None:
    """Add the page to a FastAPI app: ``GET /`` (the page), ``GET /static/<file>`` (its CSS and JS) and ``GET
    /v1/finpipe/examples``. ``facts``: returns the ``LakeFacts`` to suggest tickers and questions from."""
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException

    def served(path: Path) -> Response:
        return Response(path.read_bytes(), media_type=MEDIA_TYPES[path.suffix], headers=PAGE_HEADERS)

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return served(WEB_DIR / "index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        path = page_file(name)
        if path is None or path.name == "index.html":
            raise HTTPException(404)
        return served(path)

    @app.get(EXAMPLES_PATH)
    async def lake_examples() -> dict:
        return await asyncio.to_thread(lambda: examples(facts()))
