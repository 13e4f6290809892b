"""The OpenAI chat-completions wire format, as far as finpipe serves it, and its error bodies.

Requests are validated here, before anything reaches a model: a malformed body gets the OpenAI error JSON
(``{"error": {"message", "type", "param", "code"}}``) with the status an OpenAI client expects. An option finpipe
cannot honour (JSON mode, tools, logprobs, several choices) is refused naming it: ignoring it would answer 200 with
output that breaks what the client asked for.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ApiError(Exception):
    """An error answered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def text_only(cls, value):
        if isinstance(value, list):  # OpenAI's content parts: text parts are joined, anything else is refused
            texts = []
            for part in value:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content is supported")
                texts.append(part["text"])
            return "\n".join(texts)
        return value


MAX_STOPS = 4  # OpenAI's limit on stop strings
MAX_SEED = 2**63 - 1


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields that change nothing here (user, store, ...)

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    # refused unless harmless: finpipe answers in plain text, calls no tools and returns no logprobs
    response_format: object = None
    tools: object = None
    tool_choice: object = None
    functions: object = None
    function_call: object = None
    logprobs: object = None
    top_logprobs: object = None

    @field_validator("temperature", "top_p")
    @classmethod
    def finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("n")
    @classmethod
    def one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"only n=1 is supported (one answer per request), got {value}")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def stop_strings_valid(cls, value):
        stops = [value] if isinstance(value, str) else [] if value is None else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop string must not be empty")
        return value

    @field_validator("response_format")
    @classmethod
    def text_only_format(cls, value):
        if value is not None and value != {"type": "text"}:
            raise ValueError("only {\"type\": \"text\"} is supported: finpipe answers in plain text (no JSON mode, "
                             "no JSON schema)")
        return value

    @field_validator("tools", "functions")
    @classmethod
    def no_tools(cls, value):
        if value:
            raise ValueError("tools are not supported: finpipe's models answer in text and call no functions")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def no_tool_choice(cls, value):
        if value not in (None, "none", "auto"):
            raise ValueError("tools are not supported: finpipe's models answer in text and call no functions")
        return value

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def no_logprobs(cls, value):
        if value not in (None, False):
            raise ValueError("logprobs are not supported by this server")
        return value

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string starts in ``text`` (leading whitespace skipped, as the answer is stripped); None
    when none occurs. The same rule cuts a plain answer, a streamed one and ends the generation."""
    start = len(text) - len(text.lstrip())
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to its first stop string (stripped), and whether one was found."""
    at = find_stop(text, stops)
    return (text if at is None else text[:at]).strip(), at is not None


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(request_id: str, model: str, content: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int, finpipe: dict) -> dict:
    return {
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason,
                     "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "finpipe": finpipe,
    }


def chunk(request_id: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
          finpipe: dict | None = None) -> dict:
    body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    if finpipe is not None:
        body["finpipe"] = finpipe
    return body
