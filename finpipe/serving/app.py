"""The OpenAI-compatible HTTP server (FastAPI on uvicorn): ``GET /v1/models``, ``POST /v1/chat/completions``
(plain and streamed as server-sent events), ``GET /health``.

A chat request's last user message takes the one answering path ``finpipe ask`` and the end-to-end evaluation
take (``finpipe.inference.answering``): grounded in the lake's latest facts, refused when the lake cannot answer
it (before any model is loaded), answered by the requested model, and verified against the lake facts
(``finpipe.serving.verify``). The verdict travels with the response: a ``finpipe`` field in
the body (the last chunk when streamed) and an ``X-Finpipe-Verdict`` header (plain responses). What happens to an
unverified answer is the server's choice (``on_unverified``): flag it, abstain, or retry with sampling.
"""

import asyncio
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from finpipe.inference.answering import AnswerSpec
from finpipe.paths import LAKE_DB_NAME
from finpipe.settings import setting


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

    def __post_init__(self) -> None:
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
        if problems:
            raise ValueError("invalid serve config: " + "; ".join(problems))


def create_app(lake_dir: Path, spec: ServeSpec = ServeSpec(), log=print):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError

    from finpipe.inference.answering import REFUSED, Answer, answer, prepare
    from finpipe.inference.answering import finish as finish_answer
    from finpipe.inference.context import LakeFacts
    from finpipe.serving import protocol as p
    from finpipe.serving.engine import Engine, Job
    from finpipe.serving.facts import LakeSnapshot
    from finpipe.serving.models import ModelStore

    store = ModelStore(lake_dir, capacity=spec.models_in_memory, log=log, decode=spec)
    snapshot = LakeSnapshot(Path(lake_dir) / LAKE_DB_NAME, log=log)
    engine = Engine(batch_size=spec.batch_size, queue_limit=spec.queue_limit, log=log)
    started_at = time.time()
    app = FastAPI(title="finpipe", version="1", docs_url=None, redoc_url=None)

    @app.exception_handler(p.ApiError)
    async def api_error(request: Request, exc: p.ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.on_event("startup")
    async def startup() -> None:
        await asyncio.to_thread(store.check_champion)
        store.watch(spec.reload_every_s)

    @app.on_event("shutdown")
    async def shutdown() -> None:
        store.stop()
        engine.stop()

    @app.get("/health")
    async def health():
        return {"status": "ok", "champion": store.champion_id, "models_loaded": list(store._loaded),
                "waiting": engine.waiting, "served": engine.served, "batches": engine.batches,
                "facts_loaded_at": snapshot.loaded_at, "uptime_s": round(time.time() - started_at, 1)}

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
        if not isinstance(data, dict):
            raise p.ApiError(400, "the body must be a JSON object", code="invalid_json")
        try:
            return p.ChatRequest.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(x) for x in first.get("loc", ()))
            raise p.ApiError(400, f"{param or 'body'}: {first.get('msg')}", param=param or None,
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
        try:
            return prepare(messages[last]["content"], LakeFacts(snapshot), spec.allow_ungrounded,
                           conversation=messages[:last])
        except ValueError as exc:
            raise p.ApiError(400, str(exc), param="messages", code="invalid_value") from None

    def sampling_for(req: p.ChatRequest, loaded, prompt_tokens: int):
        from finpipe.evaluation.generation import Sampling

        wanted = req.requested_tokens or spec.default_max_tokens
        if wanted > spec.max_tokens_limit:
            raise p.ApiError(400, f"max_tokens {wanted} exceeds this server's limit of {spec.max_tokens_limit}",
                             param="max_tokens", code="max_tokens_exceeded")
        if prompt_tokens + wanted > loaded.context_length:
            raise p.ApiError(400, f"the prompt has {prompt_tokens} tokens; with max_tokens {wanted} it exceeds the "
                             f"model's context of {loaded.context_length} tokens", param="messages",
                             code="context_length_exceeded")
        return Sampling(max_new_tokens=wanted, temperature=req.temperature, top_p=req.top_p,
                        max_time_s=spec.generation_timeout_s)

    def finpipe_field(result, model_id: str) -> dict:
        verdict = result.verdict.as_dict() if result.verdict else {"verdict": REFUSED, "problems": [], "relevant": None}
        grounding = result.grounding
        return verdict | {
            "model": model_id, "champion": model_id == store.champion_id, "attempts": result.attempts,
            "status_line": result.status_line(),
            "grounding": {"tickers": grounding.tickers, "family": grounding.family,
                          "families": list(grounding.families), "as_of": grounding.as_of, "notes": grounding.notes}}

    def queued(loaded):
        """The answering path's ``Generate`` over the server's queue (called from a worker thread)."""
        return lambda messages, sampling: engine.submit(Job(loaded, messages, sampling)).result()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await read_request(request)
        prepared = await asyncio.to_thread(prepared_for, req)
        request_id, created = p.new_id(), int(time.time())
        if prepared.refusal is not None:  # answered without a model: none is loaded for it
            model_id = await asyncio.to_thread(lambda: store.resolve(req.model)[0])
            result = Answer(prepared.refusal, prepared, None)
            body = p.completion(request_id, model_id, result.text, "stop", 0, 0, finpipe_field(result, model_id))
            if req.stream:
                return StreamingResponse(_events([
                    p.chunk(request_id, model_id, created, {"role": "assistant", "content": result.text}),
                    p.chunk(request_id, model_id, created, {}, "stop", body["finpipe"])]),
                    media_type="text/event-stream")
            return JSONResponse(body, headers={"X-Finpipe-Verdict": REFUSED})
        loaded = await asyncio.to_thread(store.get, req.model)
        prompt_tokens = len(loaded.tokenizer.apply_chat_template(prepared.messages, add_generation_prompt=True,
                                                                 tokenize=True, return_dict=True)["input_ids"])
        sampling = sampling_for(req, loaded, prompt_tokens)

        if req.stream and spec.on_unverified == "flag":
            return StreamingResponse(_stream(loaded, prepared, sampling, request_id, created),
                                     media_type="text/event-stream")
        result = await asyncio.to_thread(answer, prepared, queued(loaded), sampling, spec.on_unverified)
        tokens = result.generated.new_tokens
        finish = "length" if tokens >= sampling.max_new_tokens else "stop"
        extra = finpipe_field(result, loaded.id)
        if req.stream:  # abstain/retry decide after the whole answer: it is sent as one chunk
            return StreamingResponse(_events([
                p.chunk(request_id, loaded.id, created, {"role": "assistant", "content": result.text}),
                p.chunk(request_id, loaded.id, created, {}, finish, extra)]), media_type="text/event-stream")
        return JSONResponse(p.completion(request_id, loaded.id, result.text, finish, prompt_tokens, tokens, extra),
                            headers={"X-Finpipe-Verdict": result.status})

    async def _stream(loaded, prepared, sampling, request_id, created):
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=None)
        future = engine.submit(Job(loaded, prepared.messages, sampling, streamer=streamer))
        yield _event(p.chunk(request_id, loaded.id, created, {"role": "assistant", "content": ""}))
        parts = []
        iterator = iter(streamer)
        while True:
            piece = await asyncio.to_thread(next, iterator, None)
            if piece is None:
                break
            if piece:
                parts.append(piece)
                yield _event(p.chunk(request_id, loaded.id, created, {"content": piece}))
        try:
            generated = await asyncio.wrap_future(future)
        except Exception as exc:
            yield _event({"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None,
                                    "code": "generation_failed"}})
            yield "data: [DONE]\n\n"
            return
        result = finish_answer(prepared, replace(generated, text="".join(parts).strip()))
        finish = "length" if generated.new_tokens >= sampling.max_new_tokens else "stop"
        yield _event(p.chunk(request_id, loaded.id, created, {}, finish, finpipe_field(result, loaded.id)))
        yield "data: [DONE]\n\n"

    def _event(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"

    async def _events(bodies: list[dict]):
        for body in bodies:
            yield _event(body)
        yield "data: [DONE]\n\n"

    app.state.store, app.state.engine, app.state.snapshot = store, engine, snapshot
    return app


def serve(lake_dir: Path, spec: ServeSpec, log=print) -> None:
    """Run the server until interrupted (Ctrl-C stops it cleanly)."""
    import uvicorn

    from finpipe.runtime import claim_cpu_share

    claim_cpu_share()
    app = create_app(lake_dir, spec, log=log)
    log(f"serving on http://{spec.host}:{spec.port}/v1 (OpenAI-compatible; GET /health, GET /v1/models)")
    uvicorn.run(app, host=spec.host, port=spec.port, log_level="warning", access_log=False)
