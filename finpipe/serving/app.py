"""The OpenAI-compatible HTTP server (FastAPI on uvicorn): ``GET /v1/models``, ``POST /v1/chat/completions``
(plain and streamed as server-sent events), ``GET /health``.

A chat request's last user message takes the one answering path ``finpipe ask`` and the end-to-end evaluation
take (``finpipe.inference.answering``): grounded in the lake's latest facts, refused when the lake cannot answer
it (before any model is loaded), answered by the requested model, and verified against the lake facts
(``finpipe.serving.verify``). The verdict travels with the response: a ``finpipe`` field in
the body (the last chunk when streamed) and an ``X-Finpipe-Verdict`` header (plain responses). What happens to an
unverified answer is the server's choice (``on_unverified``): flag it, abstain, or retry with sampling.

A request is checked in full (options, prompt length) before any model is loaded for it. What breaks after the
start (the champion pointer, the lake file) degrades the server instead of failing every request: the loaded
champion and the last good lake facts keep answering, and ``/health`` and each answer's ``finpipe.degraded`` say
what is wrong; ``/health`` answers 503 only when no model can answer at all.

The champion runs on PyTorch or on llama.cpp (its GGUF export; ``finpipe.serving.engine_choice``); the answering path
around the engine is the same. Every chat request is logged in one line (model, prompt+completion tokens, seconds,
tokens/s, verdict), and its answer carries the server's own timing (``finpipe.timing``).
"""

import asyncio
import errno
import ipaddress
import itertools
import json
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

from finpipe.inference.answering import AnswerSpec
from finpipe.paths import LAKE_DB_NAME
from finpipe.serving.engine_choice import ENGINES
from finpipe.serving.web import HostAllowlist, allowed_hosts, mount_web
from finpipe.settings import non_finite, setting

CHAT_PATH = "/v1/chat/completions"


class AddressInUseError(RuntimeError):
    """The port is taken (another ``finpipe serve``?): its own exit code (5), never the "lake locked" 3 that uvicorn's
    startup failure would give."""


@dataclass(frozen=True)
class ServeSpec(AnswerSpec):
    host: str = setting("127.0.0.1", "interface to listen on (the API has no authentication: keep it on loopback)")
    port: int = setting(8000, "port to listen on")
    allow_ungrounded: bool = setting(False, "answer questions that name no ticker of the lake (no market data, "
                                     "nothing to verify) instead of refusing them")
    default_max_tokens: int = setting(128, "answer length when the request sets no max_tokens")
    max_tokens_limit: int = setting(512, "the largest max_tokens a request may ask for")
    max_body_bytes: int = setting(65536, "the largest request body accepted")
    generation_timeout_s: float = setting(60.0, "a generation stops after this many seconds")
    batch_size: int = setting(8, "concurrent plain requests answered in one batch")
    queue_limit: int = setting(32, "requests waiting beyond this are refused with 503")
    models_in_memory: int = setting(2, "models kept loaded (the champion, the base, other runs)")
    reload_every_s: float = setting(2.0, "how often the champion pointer is checked for a new champion")
    engine: str = setting("auto", "what runs the champion: 'llama.cpp' (its GGUF export, recorded by `finpipe export "
                          "--gguf DIR`, run by llama-cpp-python), 'torch' (the merged model in PyTorch) or 'auto' "
                          "(llama.cpp when llama-cpp-python is installed and the champion has an export, else torch); "
                          "other models always run on torch")
    gguf: str = setting("", "a GGUF file of the champion to run on llama.cpp instead of its recorded export")
    allowed_hosts: str = setting("", "Host names the server answers besides the loopback names and the --host address "
                                 "(comma-separated; '*': any): a request for another name gets 403, as a DNS "
                                 "rebinding page would send")

    def __post_init__(self) -> None:
        if problems := non_finite(self):  # inf passes every "> 0" below: a timeout that never ends
            raise ValueError("invalid serve config: " + "; ".join(problems))
        super().__post_init__()
        problems = []
        if not 0 < self.port < 65536:
            problems.append(f"port must be in 1..65535, got {self.port}")
        for name in ("default_max_tokens", "max_tokens_limit", "max_body_bytes", "batch_size", "queue_limit",
                     "models_in_memory"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("generation_timeout_s", "reload_every_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.default_max_tokens > self.max_tokens_limit:
            problems.append("default_max_tokens must not exceed max_tokens_limit")
        if self.engine not in ENGINES:
            problems.append(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        elif self.engine == "torch" and self.gguf:
            problems.append("gguf runs a GGUF file on llama.cpp: it cannot be combined with engine 'torch'")
        try:
            allowed_hosts(self.allowed_hosts, self.host)
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise ValueError("invalid serve config: " + "; ".join(problems))


def create_app(lake_dir: Path, spec: ServeSpec = ServeSpec(), log=print):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException

    from finpipe.inference.answering import REFUSED, Answer, answer, prepare
    from finpipe.inference.answering import finish as finish_answer
    from finpipe.serving import protocol as p
    from finpipe.serving.engine import Engine, Job
    from finpipe.serving.facts import LakeSnapshot
    from finpipe.serving.models import ModelStore
    from finpipe.serving.verify import grounding_as_dict

    engine = Engine(batch_size=spec.batch_size, queue_limit=spec.queue_limit, log=log)
    store = ModelStore(lake_dir, capacity=spec.models_in_memory, log=log, decode=spec, engine=spec.engine,
                       gguf=spec.gguf or None, compute=engine.call)
    snapshot = LakeSnapshot(Path(lake_dir) / LAKE_DB_NAME, log=log)
    started_at = time.time()
    app = FastAPI(title="finpipe", version="1", docs_url=None, redoc_url=None)
    app.add_middleware(HostAllowlist, allowed=allowed_hosts(spec.allowed_hosts, spec.host), log=log)
    mount_web(app, snapshot.facts)  # GET / (the chat page), /static/*, /v1/finpipe/examples

    @app.exception_handler(p.ApiError)
    async def api_error(request: Request, exc: p.ApiError):
        if request.url.path == CHAT_PATH:
            log(f"POST {CHAT_PATH}: {exc.status} {exc.code or exc.type}: {exc.message}")
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def route_error(request: Request, exc: HTTPException):
        """An unknown path or a wrong method: OpenAI's error JSON too (an OpenAI client reads ``error.message``)."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        message = {404: f"no such endpoint: {request.method} {request.url.path} (this server has GET / (the chat "
                        "page), POST /v1/chat/completions, GET /v1/models and GET /health)",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        body = p.ApiError(exc.status_code, message, code=code).body()
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log(f"unexpected error answering {request.url.path}: {exc!r}")
        first = (str(exc).strip().splitlines() or [""])[0]
        body = p.ApiError(500, f"internal error: {type(exc).__name__}: {first}", type_="server_error",
                          code="internal_error").body()
        return JSONResponse(body, status_code=500)

    @app.on_event("startup")
    async def startup() -> None:
        try:  # a champion that cannot be served is a degradation (/health says why), not a server that never starts
            await asyncio.to_thread(store.check_champion)
        except Exception as exc:
            store.note_problem(f"the champion could not be checked ({exc!r})")
        # PyTorch's precision decided now, while nothing generates (done already when the champion runs on PyTorch)
        await asyncio.to_thread(store.torch_dtype)
        store.watch(spec.reload_every_s)

    @app.on_event("shutdown")
    async def shutdown() -> None:
        idle = await asyncio.to_thread(engine.stop, 5.0)
        store.stop(close=idle)

    def degraded() -> list[str]:
        """What is wrong now that the server works around (empty when nothing is)."""
        return ([snapshot.problem] if snapshot.problem else []) + store.problems()

    @app.get("/health")
    async def health():
        """Whether it can answer: "ok", or "degraded" with the reasons; 503 only when no model can answer at all."""
        await asyncio.to_thread(snapshot.refresh)
        problems = await asyncio.to_thread(degraded)
        can_answer = snapshot.loaded_at is not None and await asyncio.to_thread(store.can_answer)
        champion = store.champion_model()
        body = {"status": "degraded" if problems else "ok", "can_answer": can_answer, "degraded": problems,
                "lake": str(Path(lake_dir).resolve()), "on_unverified": spec.on_unverified,
                "decode_weights": spec.decode_weights, "engine_setting": spec.engine,
                "engine": champion.engine if champion else None,
                "decoder": champion.decoder if champion and champion.engine == "torch" else None,
                "precision": champion.precision if champion else None,
                "gguf": str(champion.gguf.path) if champion and champion.gguf else None,
                "engine_note": store.engine_note, "torch_precision": store.precision_line(),
                "champion": store.champion_id, "champion_pointer_ok": store.champion_problem is None,
                "lake_readable": snapshot.problem is None, "models_loaded": store.loaded_ids,
                "waiting": engine.waiting, "generating": engine.active, "cancelled": engine.cancelled,
                "served": engine.served, "batches": engine.batches, "facts_loaded_at": snapshot.loaded_at,
                "uptime_s": round(time.time() - started_at, 1)}
        return JSONResponse(body, status_code=200 if can_answer else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": store.listing()}

    async def read_request(request: Request) -> p.ChatRequest:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > spec.max_body_bytes:
            raise p.ApiError(413, f"the request body is {declared} bytes; the limit is {spec.max_body_bytes}",
                             code="request_too_large")
        body = b""
        async for part in request.stream():
            body += part
            if len(body) > spec.max_body_bytes:
                raise p.ApiError(413, f"the request body exceeds {spec.max_body_bytes} bytes", code="request_too_large")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise p.ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
        except RecursionError:  # e.g. 30,000 nested lists: refused, never a crash
            raise p.ApiError(400, "the body is not valid JSON for this server: it is nested too deeply",
                             code="invalid_json") from None
        if not isinstance(data, dict):
            raise p.ApiError(400, "the body must be a JSON object", code="invalid_json")
        try:
            return p.ChatRequest.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(x) for x in first.get("loc", ()))
            message = str(first.get("msg", "")).removeprefix("Value error, ")
            raise p.ApiError(400, f"{param or 'body'}: {message}", param=param or None,
                             code="invalid_value") from None

    def prepared_for(req: p.ChatRequest):
        """The request's last user message through the answering path's first steps (ground, refuse): only lake
        facts are ground truth; a "Market data for ..." block the client wrote stays question text."""
        messages = [m.model_dump() for m in req.messages]
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users or not messages[users[-1]]["content"].strip():
            raise p.ApiError(400, "the messages need a non-empty user message", param="messages", code="invalid_value")
        last = users[-1]
        snapshot.refresh()
        try:  # the snapshot's facts, read once per snapshot: not queried again per request
            return prepare(messages[last]["content"], snapshot.facts(), spec.allow_ungrounded,
                           conversation=messages[:last])
        except ValueError as exc:
            raise p.ApiError(400, str(exc), param="messages", code="invalid_value") from None

    def max_tokens_for(req: p.ChatRequest) -> int:
        wanted = req.requested_tokens or spec.default_max_tokens
        if wanted > spec.max_tokens_limit:
            raise p.ApiError(400, f"max_tokens {wanted} exceeds this server's limit of {spec.max_tokens_limit}",
                             param="max_tokens", code="max_tokens_exceeded")
        return wanted

    def sampling_for(req: p.ChatRequest, wanted: int, context_length: int, prompt_tokens: int):
        from finpipe.evaluation.generation import Sampling

        if prompt_tokens + wanted > context_length:
            raise p.ApiError(400, f"the prompt has {prompt_tokens} tokens; with max_tokens {wanted} it exceeds the "
                             f"model's context of {context_length} tokens", param="messages",
                             code="context_length_exceeded")
        return Sampling(max_new_tokens=wanted, temperature=req.temperature, top_p=req.top_p,
                        max_time_s=spec.generation_timeout_s)

    def finish_reason(generated, sampling) -> str:
        if getattr(generated, "stopped", False):  # a stop string ended it
            return "stop"
        return "length" if generated.new_tokens >= sampling.max_new_tokens else "stop"

    def finpipe_field(result, model_id: str, timing: dict | None = None) -> dict:
        verdict = result.verdict.as_dict() if result.verdict else {"verdict": REFUSED, "problems": [], "relevant": None,
                                                                   "numbers": []}
        grounding = result.grounding
        return verdict | {
            "model": model_id, "champion": model_id == store.champion_id, "attempts": result.attempts,
            "status_line": result.status_line(), "degraded": degraded(),
            "grounding": grounding_as_dict(grounding),
            **({"timing": timing} if timing is not None else {})}

    def timing_of(started: float, served: list) -> dict:
        """The request's time in the server: all of it, waiting in the queue, and generating (each attempt's
        generation; a batch's whole wall time)."""
        return {"server_s": round(time.perf_counter() - started, 4),
                "queued_s": round(sum(g.queued_s for g in served), 4),
                "generation_s": round(sum(g.wall_s for g in served), 4)}

    def log_request(req: p.ChatRequest, model_id: str, prompt_tokens: int, served: list, started: float,
                    verdict: str, how: str = "") -> None:
        """One line per chat request: `POST /v1/chat/completions champion <run>: 155+49 tokens, 1.52 s (generation
        1.49 s, 32.9 tokens/s), verified`."""
        who = model_id if req.model == model_id else f"{req.model} {model_id}"
        tokens, generating = sum(g.new_tokens for g in served), sum(g.wall_s for g in served)
        rate = f", {tokens / generating:.1f} tokens/s" if generating > 0 else ""
        log(f"POST {CHAT_PATH} {who}: {prompt_tokens}+{tokens} tokens, {time.perf_counter() - started:.2f} s "
            f"(generation {generating:.2f} s{rate}{how}), {verdict}")

    def queued(loaded, req: p.ChatRequest, served: list):
        """The answering path's ``Generate`` over the server's queue (called from a worker thread). Every call gets
        the request's stop strings; with a seed, call k samples with seed + k: the same request gives the same
        answers, and a retry draws anew. Each generation is also appended to ``served`` (its timing)."""
        calls = itertools.count()

        def generate(messages, sampling):
            seed = None if req.seed is None else (req.seed + next(calls)) % (p.MAX_SEED + 1)
            result = engine.submit(Job(loaded, messages, sampling, stop=req.stop_strings, seed=seed)).result()
            served.append(result)
            return result

        return generate

    @app.post(CHAT_PATH)
    async def chat(request: Request):
        started = time.perf_counter()
        req = await read_request(request)
        wanted = max_tokens_for(req)
        prepared = await asyncio.to_thread(prepared_for, req)
        request_id, created = p.new_id(), int(time.time())
        if prepared.refusal is not None:  # answered without a model: none is loaded for it
            model_id = await asyncio.to_thread(lambda: store.resolve(req.model)[0])
            result = Answer(prepared.refusal, prepared, None)
            body = p.completion(request_id, model_id, result.text, "stop", 0, 0,
                                finpipe_field(result, model_id, timing_of(started, [])))
            log_request(req, model_id, 0, [], started, REFUSED)
            if req.stream:
                return StreamingResponse(_events([
                    p.chunk(request_id, model_id, created, {"role": "assistant", "content": result.text}),
                    p.chunk(request_id, model_id, created, {}, "stop", body["finpipe"])]),
                    media_type="text/event-stream")
            return JSONResponse(body, headers={"X-Finpipe-Verdict": REFUSED})
        # the whole request is checked before a model is loaded for it (a 400 never loads one, nor evicts another)
        target, tokenizer, context_length = await asyncio.to_thread(store.preflight, req.model)
        prompt_tokens = await asyncio.to_thread(lambda: len(tokenizer.apply_chat_template(
            prepared.messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]))
        sampling = sampling_for(req, wanted, context_length, prompt_tokens)
        loaded = await asyncio.to_thread(store.load, *target)

        if req.stream and spec.on_unverified == "flag":
            if loaded.engine == "llama.cpp" or loaded.decoder == "lean":
                from finpipe.serving.engine import TextStream

                streamer = TextStream()
            else:
                from transformers import TextIteratorStreamer

                streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                                timeout=None)
            job = Job(loaded, prepared.messages, sampling, streamer=streamer, stop=req.stop_strings, seed=req.seed)
            engine.submit(job)  # a full queue is a 503 now, not a broken stream
            return StreamingResponse(_stream(job, prepared, request_id, created, req, prompt_tokens, started),
                                     media_type="text/event-stream")
        served: list = []
        result = await asyncio.to_thread(answer, prepared, queued(loaded, req, served), sampling, spec.on_unverified)
        tokens = result.generated.new_tokens
        finish = finish_reason(result.generated, sampling)
        extra = finpipe_field(result, loaded.id, timing_of(started, served))
        log_request(req, loaded.id, prompt_tokens, served, started, result.status,
                    f", {result.attempts} attempts" if result.attempts > 1 else "")
        if req.stream:  # abstain/retry decide after the whole answer: it is sent as one chunk
            return StreamingResponse(_events([
                p.chunk(request_id, loaded.id, created, {"role": "assistant", "content": result.text}),
                p.chunk(request_id, loaded.id, created, {}, finish, extra)]), media_type="text/event-stream")
        return JSONResponse(p.completion(request_id, loaded.id, result.text, finish, prompt_tokens, tokens, extra),
                            headers={"X-Finpipe-Verdict": result.status})

    async def _stream(job: Job, prepared, request_id: str, created: int, req: p.ChatRequest, prompt_tokens: int,
                      started: float):
        """The job's tokens as server-sent events. Text that could begin a stop string is held back until it cannot;
        a client that goes away (the generator is cancelled or closed) cancels the job, which ends its generation at
        the next token."""
        model_id, stops = job.loaded.id, job.stop
        hold = max((len(s) for s in stops), default=1) - 1
        done = False
        try:
            yield _event(p.chunk(request_id, model_id, created, {"role": "assistant", "content": ""}))
            text, sent, cut = "", 0, None
            iterator = iter(job.streamer)
            while True:
                piece = await asyncio.to_thread(next, iterator, None)
                if piece is None:
                    break
                if not piece or cut is not None:  # past a stop string nothing more is sent
                    continue
                text += piece
                cut = p.find_stop(text, stops) if stops else None
                end = cut if cut is not None else len(text) - hold
                if end > sent:
                    yield _event(p.chunk(request_id, model_id, created, {"content": text[sent:end]}))
                    sent = end
            if cut is None and sent < len(text):
                yield _event(p.chunk(request_id, model_id, created, {"content": text[sent:]}))
            try:
                generated = await asyncio.wrap_future(job.future)
            except Exception as exc:
                yield _event({"error": {"message": f"generation failed: {exc}", "type": "server_error",
                                        "param": None, "code": "generation_failed"}})
                yield "data: [DONE]\n\n"
                done = True
                return
            result = finish_answer(prepared, replace(generated, text=(text if cut is None else text[:cut]).strip()))
            finish = "stop" if cut is not None else finish_reason(generated, job.sampling)
            yield _event(p.chunk(request_id, model_id, created, {}, finish,
                                 finpipe_field(result, model_id, timing_of(started, [generated]))))
            yield "data: [DONE]\n\n"
            done = True
            log_request(req, model_id, prompt_tokens, [generated], started, result.status, ", streamed")
        finally:
            if not done:  # the client went away: free the worker for the others
                job.cancel.set()
                log(f"POST {CHAT_PATH} {model_id}: the client went away after {time.perf_counter() - started:.2f} s")

    def _event(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"

    async def _events(bodies: list[dict]):
        for body in bodies:
            yield _event(body)
        yield "data: [DONE]\n\n"

    app.state.store, app.state.engine, app.state.snapshot = store, engine, snapshot
    return app


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) reaches this machine only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, taken before anything loads: a port in use is one line at once (``AddressInUseError``)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except OSError as exc:
        raise ValueError(f"cannot listen on {host!r}: {exc.strerror or exc}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart is not blocked by TIME_WAIT
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUseError(f"cannot listen on {host}:{port}: the address is already in use (another "
                                    "`finpipe serve`?); stop that process or choose another --port") from None
        if exc.errno == errno.EACCES:
            raise PermissionError(f"cannot listen on {host}:{port}: permission denied (ports below 1024 need "
                                  "privileges)") from None
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def check_engine_now(lake_dir: Path, spec: ServeSpec) -> None:
    """``--engine llama.cpp`` (or ``--gguf``) without llama-cpp-python, without a champion or without its export: one
    line naming what to do, before anything loads (``auto`` falls back to torch instead)."""
    from finpipe.models import registry
    from finpipe.serving.engine_choice import champion_candidates

    if spec.engine != "llama.cpp" and not spec.gguf:
        return
    pointer = registry.champion_pointer(lake_dir)
    if not pointer.exists():
        raise FileNotFoundError(f"--engine llama.cpp serves the champion's GGUF export, and there is no champion yet "
                                f"({pointer} is missing): run `finpipe run` first")
    run_id = registry.read_pointer(pointer, required=registry.ADAPTER_POINTER_FIELDS)["run_id"]
    try:
        champion_candidates(lake_dir, "llama.cpp", spec.gguf or None, run_id)
    except ImportError as exc:  # a missing optional package is bad configuration here, not a crash
        raise ValueError(f"--engine llama.cpp: {exc}") from None


def ready_line(spec: ServeSpec, store) -> str:
    """What the server says once it can answer: where, and what runs the champion at which precision."""
    line = (f"serving on http://{spec.host}:{spec.port}/v1 (OpenAI-compatible; GET /health, GET /v1/models); "
            f"chat page at http://{spec.host}:{spec.port}/")
    champion = store.champion_model()
    if champion is not None:
        line += f"; champion {champion.id} on {champion.engine}, {champion.precision}"
    elif store.champion_problem:
        line += f"; no champion served: {store.champion_problem}"
    if precision := store.precision_line():
        line += f"; PyTorch precision {precision}, kept for every PyTorch model and reload"
    return line


def serve(lake_dir: Path, spec: ServeSpec, log=print) -> None:
    """Run the server until interrupted (Ctrl-C stops it cleanly)."""
    import uvicorn

    from finpipe.runtime import claim_cpu_share

    check_engine_now(lake_dir, spec)
    sock = listen(spec.host, spec.port)
    try:
        if not is_loopback(spec.host):
            log(f"warning: listening on {spec.host}, reachable from other machines, and the API has no "
                f"authentication: anyone who reaches port {spec.port} can use it (put an authenticating proxy in "
                "front of it, or keep --host 127.0.0.1)")
        claim_cpu_share()
        app = create_app(lake_dir, spec, log=log)

        class Server(uvicorn.Server):
            async def startup(self, sockets=None) -> None:
                await super().startup(sockets=sockets)  # the champion is loaded in the app's startup, before this
                if self.started:  # only now can a request be answered
                    log(ready_line(spec, app.state.store))

        server = Server(uvicorn.Config(app, host=spec.host, port=spec.port, log_level="warning", access_log=False))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # as uvicorn.run: Ctrl-C has already stopped the server cleanly
            pass
        except SystemExit:  # uvicorn's startup failure exits 3, which finpipe's exit codes keep for a locked lake
            raise RuntimeError("the server failed to start (see the lines above)") from None
    finally:
        sock.close()
