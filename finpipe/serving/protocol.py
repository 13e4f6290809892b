"""The OpenAI chat-completions wire format, as far as finpipe serves it, and its error bodies.

Requests are validated here, before anything reaches a model: a malformed body gets the OpenAI error JSON
(``{"error": {"message", "type", "param", "code"}}``) with the status an OpenAI client expects.
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


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields finpipe has no use for (user, seed, ...)

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)

    @field_validator("temperature", "top_p")
    @classmethod
    def finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


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
