"""The OpenAI wire format: request bodies (validated by pydantic), response and stream-chunk bodies, errors."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
)

from ..config import SEED_RANGE
from .decoding import Completion

# ------------------------------------------------------------------ requests

# Below this a sampling temperature turns the model's logits into inf/nan probabilities (logits / T
# overflows float32); 0 asks for greedy decoding, which is what such a temperature means anyway.
MIN_TEMPERATURE = 1e-3


def encodable(text: str) -> str:
    """``text`` when it is valid Unicode: JSON may carry a lone surrogate (``"\\ud800"``), which no
    tokenizer or file can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text must be valid Unicode; it holds {text[e.start:e.end]!r} at position {e.start}") from None
    if "\x00" in text:
        raise ValueError(f"text must not hold a NUL character (at position {text.index(chr(0))})")
    return text


Text = Annotated[str, AfterValidator(encodable)]


def not_a_bool(value: Any) -> Any:
    """pydantic's lax mode reads ``true`` as the number 1; a client that sends it meant something else."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not {str(value).lower()}")
    return value


# Lax (a numeric string passes, as before) but never a bool, NaN or an infinity ("must be a finite number").
Number = Annotated[float, BeforeValidator(not_a_bool)]


class SamplingFields(BaseModel):
    """Fields both endpoints share. Unknown OpenAI fields (logprobs, user, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: Text = Field(min_length=1)
    temperature: Number = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: Number = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    # Strict: in lax mode ``"stream": "yes"`` is True and ``"max_tokens": true`` is 1; both get a 400 instead.
    n: StrictInt = Field(1, ge=1, le=1, description="one choice per request")
    stream: StrictBool = False
    stop: Text | list[Text] | None = Field(None)
    seed: StrictInt | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])

    @field_validator("temperature")
    @classmethod
    def sampling_or_greedy(cls, value: float) -> float:
        if 0.0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {value!r}")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    prompt: Text | list[StrictInt]
    max_tokens: StrictInt = Field(16, ge=1)  # OpenAI's default for /v1/completions


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: Text | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class LoadDiffRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Text
    path: Text


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: StrictInt | None = Field(None, ge=1)


# ------------------------------------------------------------------ errors


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "code", "param"}}``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


# ------------------------------------------------------------------ responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def completion_body(rid: str, model: str, c: Completion) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}],
        "usage": usage(c),
    }


def completion_chunk(rid: str, model: str, text: str, finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


def chat_body(rid: str, model: str, c: Completion) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}],
        "usage": usage(c),
    }


def chat_chunk(rid: str, model: str, delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def model_card(model_id: str, root: str, created: int, parent: str | None = None) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "sparseft", "root": root, "parent": parent}
