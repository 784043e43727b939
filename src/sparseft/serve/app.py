"""The HTTP server: an OpenAI-compatible API over one base model and many sparse diffs.

``model`` in a request picks the base (its served name), a diff (its current version) or
``NAME@VERSION``. Admin routes load, unload and roll back diffs at run time; ``/metrics`` and
``/health`` are for operators. Every error is answered in OpenAI's shape
``{"error": {"message", "type", "code", "param"}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import positive_count
from ..errors import InvalidModelError, ServerBusyError, SparseFTError, UnknownDiffError
from .decoding import Completion, SamplingParams, encode_chat, encode_text
from .engine import Engine
from .metrics import ServeMetrics
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    LoadDiffRequest,
    RollbackRequest,
    chat_body,
    chat_chunk,
    completion_body,
    completion_chunk,
    error_body,
    model_card,
    new_id,
)
from .registry import DiffRegistry, DiffVersion

log = logging.getLogger(__name__)

KNOWN_PATHS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics", "/admin/diffs"}


@dataclass
class ServeLimits:
    """What one request may ask for; over a limit it gets 413 (body) or 400 (tokens)."""

    max_body_bytes: int = 1 << 20
    max_tokens: int = 512
    max_prompt_tokens: int | None = None  # None: the model's context length (0 is refused, not "no limit")
    max_queue: int = 256

    def __post_init__(self) -> None:  # at start-up: a limit of 0 or less would fail every request
        for name in ("max_body_bytes", "max_tokens", "max_prompt_tokens", "max_queue"):
            value = getattr(self, name)
            if value is not None or name != "max_prompt_tokens":
                setattr(self, name, positive_count(name, value))


class AsyncEvents:
    """Carries a job's events from the worker thread into the request's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def __call__(self, kind: str, payload: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass

    async def result(self) -> Completion:
        while True:
            kind, payload = await self.queue.get()
            if kind == "done":
                return payload
            if kind == "error":
                raise as_api_error(payload)


def as_api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, ServerBusyError):
        return APIError(503, str(e), "server_error", "server_busy")
    if isinstance(e, UnknownDiffError):
        return APIError(404, str(e), "invalid_request_error", "model_not_found", "model")
    if isinstance(e, InvalidModelError):
        return APIError(400, str(e), "invalid_request_error", "invalid_model", "model")
    if isinstance(e, SparseFTError):
        return APIError(400, str(e), "invalid_request_error", snake_case(type(e).__name__))
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", "server_error", "internal_error")


def snake_case(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name.removesuffix("Error")).lstrip("_")


class BodyLimit:
    """ASGI middleware: answers 413 to a body over ``max_bytes`` before any handler reads it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self.too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client left before sending the body
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self.too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls report the client's disconnect

        await self.app(scope, replay, send)

    async def too_large(self, scope, receive, send):
        message = f"request body is over this server's limit of {self.max_bytes} bytes"
        await JSONResponse(error_body(message, "invalid_request_error", "body_too_large"), status_code=413)(
            scope, receive, send
        )


def endpoint_label(path: str) -> str:
    """The ``endpoint`` label of a path: known routes by name, anything else as "other" (bounded cardinality)."""
    return path if path in KNOWN_PATHS else "other"


class CountErrors:
    """ASGI middleware around everything else: every response with an error status is counted in
    ``request_errors``, whoever answered it (a route, BodyLimit's 413, FastAPI itself), and an exception
    no handler took is answered with a JSON 500 in OpenAI's shape, not Starlette's plain-text one."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400:
                    self.metrics.request_errors.labels(endpoint_label(scope["path"]), str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception as e:
            if started:  # the response is under way; nothing else can be sent
                raise
            log.exception("unhandled error answering %s %s", scope.get("method"), scope["path"])
            error = APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error", "internal_error")
            await JSONResponse(error.body(), status_code=500)(scope, receive, counting_send)


@dataclass
class ServeContext:
    """What every route shares: the engine, the registry, the base's served name and the limits.

    ``create_app`` puts one on ``app.state.serve``; routes get it through ``Depends(serve_context)``.
    """

    engine: Engine
    registry: DiffRegistry
    base_name: str
    limits: ServeLimits = field(default_factory=ServeLimits)
    admin_token: str | None = None
    started: int = field(default_factory=lambda: int(time.time()))
    context_tokens: int = field(init=False)  # the model's context length
    vocab_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.context_tokens = int(getattr(self.engine.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.vocab_size = self.engine.model.get_input_embeddings().num_embeddings

    @property
    def metrics(self) -> ServeMetrics:
        return self.engine.metrics

    def resolve(self, model_id: str) -> DiffVersion | None:
        """The diff a request's ``model`` names; None for the base."""
        return None if model_id == self.base_name else self.registry.resolve(model_id)

    def served_name(self, diff: DiffVersion | None) -> str:
        return self.base_name if diff is None else diff.key

    def labels(self, diff: DiffVersion | None) -> tuple[str, str]:
        """The (diff, version) labels of the per-diff metrics."""
        return (self.base_name, "") if diff is None else (diff.name, str(diff.version))


def serve_context(request: Request) -> ServeContext:
    return request.app.state.serve


# ---------------------------------------------------------------- errors


def answer(request: Request, error: APIError) -> JSONResponse:
    """The error in OpenAI's shape (``CountErrors`` counts it in ``request_errors``)."""
    return JSONResponse(error.body(), status_code=error.status)


async def on_api_error(request: Request, e: APIError):
    return answer(request, e)


async def on_sparseft_error(request: Request, e: SparseFTError):
    return answer(request, as_api_error(e))


async def on_invalid_body(request: Request, e: RequestValidationError):
    problems = e.errors()
    first = problems[0] if problems else {}
    # Leave out pydantic's validator and union-branch labels ("function-after[...]", "list[int]").
    parts = [str(p) for p in first.get("loc", ()) if p != "body" and not any(c in str(p) for c in "[(")]
    where, reason = ".".join(parts) or "body", first.get("msg", "malformed")
    if first.get("type") == "json_invalid":  # its loc ends with a character offset, not a field; msg says only "error"
        where = "body"
        reason = f"not valid JSON at character {first['loc'][-1]} ({first.get('ctx', {}).get('error', reason)})"
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    return answer(request, invalid_body(where, reason + more))


def invalid_body(where: str, reason: str) -> APIError:
    """The 400 for a request body that cannot be read, or whose field ``where`` is wrong."""
    return APIError(400, f"invalid request body: {where}: {reason}", "invalid_request_error", "invalid_request", where)


async def on_http_error(request: Request, e: StarletteHTTPException):
    if isinstance(e.__cause__, UnicodeDecodeError):  # FastAPI's body reader says only "error parsing the body"
        bad = e.__cause__
        reason = f"not valid JSON text: byte {bad.start} is not valid {bad.encoding} ({bad.reason})"
        return answer(request, invalid_body("body", reason))
    code = "not_found" if e.status_code == 404 else "http_error"
    return answer(request, APIError(e.status_code, str(e.detail), "invalid_request_error", code))


# ---------------------------------------------------------------- generation helpers


def check_budget(ctx: ServeContext, prompt_ids: list[int], max_tokens: int | None) -> int:
    """The request's ``max_tokens`` after checking prompt and output fit the server's limits and the context."""
    limits, context = ctx.limits, ctx.context_tokens
    if not prompt_ids:
        raise APIError(400, "the prompt is empty after tokenization", param="prompt")
    prompt_limit = min(limits.max_prompt_tokens or context, context)
    if len(prompt_ids) > prompt_limit:
        raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this server accepts at most {prompt_limit}",
                       code="context_length_exceeded", param="prompt")
    if max_tokens is None:  # chat without a limit: as much as the limits and the context allow
        max_tokens = min(limits.max_tokens, context - len(prompt_ids))
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens={max_tokens} is over this server's limit of {limits.max_tokens}",
                       code="max_tokens_exceeded", param="max_tokens")
    if len(prompt_ids) + max_tokens > context:
        raise APIError(400, f"{len(prompt_ids)} prompt tokens + max_tokens={max_tokens} exceed the model's "
                       f"context of {context} tokens", code="context_length_exceeded", param="max_tokens")
    return max_tokens


def params_of(body, max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          stop=body.stop_list(), seed=body.seed)


def record(ctx: ServeContext, endpoint: str, diff: DiffVersion | None, c: Completion, start: float) -> None:
    """Count a finished request in the per-diff metrics."""
    lab, metrics = ctx.labels(diff), ctx.metrics
    metrics.requests.labels(*lab, endpoint).inc()
    metrics.prompt_tokens.labels(*lab).inc(c.prompt_tokens)
    metrics.completion_tokens.labels(*lab).inc(c.completion_tokens)
    metrics.latency.labels(*lab).observe(time.perf_counter() - start)


async def respond(ctx: ServeContext, endpoint: str, diff, prompt_ids, params: SamplingParams, stream: bool, chat: bool):
    """Queue the generation; answer with the whole body, or stream it as server-sent events."""
    start = time.perf_counter()
    rid, model = new_id("chatcmpl" if chat else "cmpl"), ctx.served_name(diff)
    events = AsyncEvents()
    job = ctx.engine.submit(diff, prompt_ids, params, events)
    if stream:
        chunks = sse(ctx, endpoint, diff, events, job, rid, model, chat, start)
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        c = await events.result()
    finally:
        job.cancel()  # no-op once finished; stops the worker if this client went away
    record(ctx, endpoint, diff, c, start)
    return chat_body(rid, model, c) if chat else completion_body(rid, model, c)


async def sse(ctx: ServeContext, endpoint, diff, events: AsyncEvents, job, rid, model, chat, start) -> AsyncIterator[str]:
    """The job's text pieces as OpenAI stream chunks, then the finish reason (or the error), then [DONE]."""

    def chunk(text: str, finish: str | None = None) -> str:
        body = chat_chunk(rid, model, {"content": text} if text else {}, finish) if chat else completion_chunk(
            rid, model, text, finish)
        return f"data: {json.dumps(body)}\n\n"

    try:
        if chat:
            yield f"data: {json.dumps(chat_chunk(rid, model, {'role': 'assistant', 'content': ''}))}\n\n"
        while True:
            kind, payload = await events.queue.get()
            if kind == "text":
                yield chunk(payload)
            elif kind == "done":
                record(ctx, endpoint, diff, payload, start)
                yield chunk("", payload.finish_reason)
                break
            else:
                error = as_api_error(payload)
                ctx.metrics.request_errors.labels(endpoint, str(error.status)).inc()
                yield f"data: {json.dumps(error.body())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


# ---------------------------------------------------------------- OpenAI routes

router = APIRouter()


@router.get("/v1/models")
async def list_models(ctx: ServeContext = Depends(serve_context)):
    cards = [model_card(ctx.base_name, ctx.base_name, ctx.started)]
    for name, versions in ctx.registry.snapshot():
        cards.append(model_card(name, ctx.base_name, ctx.started, parent=ctx.base_name))
        cards += [model_card(v.key, ctx.base_name, int(v.loaded_at), parent=name) for v in versions]
    return {"object": "list", "data": cards}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, ctx: ServeContext = Depends(serve_context)):
    diff = ctx.resolve(body.model)
    if isinstance(body.prompt, list):
        bad = [t for t in body.prompt if not 0 <= t < ctx.vocab_size]
        if bad:
            raise APIError(400, f"prompt token ids must be in [0, {ctx.vocab_size}), got {bad[:5]}", param="prompt")
        prompt_ids = list(body.prompt)
    else:
        prompt_ids = encode_text(ctx.engine.tokenizer, body.prompt)
    params = params_of(body, check_budget(ctx, prompt_ids, body.max_tokens))
    return await respond(ctx, "/v1/completions", diff, prompt_ids, params, body.stream, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, ctx: ServeContext = Depends(serve_context)):
    diff = ctx.resolve(body.model)
    if not getattr(ctx.engine.tokenizer, "chat_template", None):
        raise APIError(400, f"the tokenizer of {ctx.base_name} has no chat template; use /v1/completions",
                       code="no_chat_template", param="messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt_ids = encode_chat(ctx.engine.tokenizer, messages)
    params = params_of(body, check_budget(ctx, prompt_ids, body.requested_max_tokens()))
    return await respond(ctx, "/v1/chat/completions", diff, prompt_ids, params, body.stream, chat=True)


# ---------------------------------------------------------------- admin routes
# The registry's changes write registry.json (and copy or delete diff files): they run in the thread pool.


def require_admin(request: Request) -> None:
    token = serve_context(request).admin_token
    if token is not None and request.headers.get("authorization") != f"Bearer {token}":
        raise APIError(401, "admin routes need the header 'Authorization: Bearer <admin token>'",
                       "authentication_error", "invalid_admin_token")


admin = APIRouter(prefix="/admin/diffs", dependencies=[Depends(require_admin)])


def version_info(ctx: ServeContext, v: DiffVersion) -> dict[str, Any]:
    return {"name": v.name, "version": v.version, "model": v.key, "num_entries": v.num_entries,
            "source": v.source, "current": ctx.registry.current(v.name) is v}


@admin.get("")
async def list_diffs(ctx: ServeContext = Depends(serve_context)):
    return {"base": ctx.base_name, "merged": ctx.served_name(ctx.engine.merged), "diffs": ctx.registry.listing()}


@admin.post("", status_code=201)
async def load_diff(body: LoadDiffRequest, ctx: ServeContext = Depends(serve_context)):
    loaded = await run_in_threadpool(ctx.registry.load, body.name, body.path)
    ctx.metrics.diff_versions.set(ctx.registry.count_versions())
    return version_info(ctx, loaded)


@admin.delete("/{name}")
async def unload_diff(name: str, ctx: ServeContext = Depends(serve_context)):
    removed = await run_in_threadpool(ctx.registry.unload, name)
    for v in removed:
        await run_in_threadpool(ctx.engine.forget, v)
    ctx.metrics.diff_versions.set(ctx.registry.count_versions())
    return {"name": name, "unloaded_versions": [v.version for v in removed]}


@admin.post("/{name}/rollback")
async def rollback_diff(name: str, body: RollbackRequest | None = None, ctx: ServeContext = Depends(serve_context)):
    current = await run_in_threadpool(ctx.registry.rollback, name, body.version if body else None)
    return version_info(ctx, current)


# ---------------------------------------------------------------- operators


@router.get("/health")
async def health(ctx: ServeContext = Depends(serve_context)):
    engine = ctx.engine
    state = {"status": "ok" if engine.alive else "worker stopped", "model": ctx.base_name,
             "diffs": len(ctx.registry.names()), "merged": ctx.served_name(engine.merged),
             "queue_depth": engine.queue_depth}
    return JSONResponse(state, status_code=200 if engine.alive else 503)


@router.get("/metrics")
async def prometheus(ctx: ServeContext = Depends(serve_context)):
    content, content_type = ctx.metrics.render()
    return Response(content, media_type=content_type)


def create_app(
    engine: Engine,
    registry: DiffRegistry,
    base_name: str,
    limits: ServeLimits | None = None,
    admin_token: str | None = None,
) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops ``engine``'s worker."""
    ctx = ServeContext(engine, registry, base_name, limits or ServeLimits(), admin_token)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="sparseft serve", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=ctx.limits.max_body_bytes)
    app.add_middleware(CountErrors, metrics=ctx.metrics)  # added last: outermost, so it sees BodyLimit's 413 too
    app.state.serve = ctx
    app.state.engine, app.state.registry, app.state.base_name = engine, registry, base_name
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(SparseFTError, on_sparseft_error)
    app.add_exception_handler(RequestValidationError, on_invalid_body)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.include_router(router)
    app.include_router(admin)
    ctx.metrics.diff_versions.set(registry.count_versions())
    return app
