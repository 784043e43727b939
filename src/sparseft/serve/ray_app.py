"""Scale-out on Ray Serve: N replicas of the same app, each holding the base, diffs loaded per replica on demand.

Two deployments wrap the app that ``build_app`` makes; neither forks it:

- ``DiffRouter``, the HTTP ingress, reads the ``model`` of a completion request and forwards the request
  through a handle with ``multiplexed_model_id=NAME``; Ray Serve then sends it to a replica that already
  holds ``NAME`` when there is one, else to the replica holding the fewest diffs.
- ``DiffReplica`` holds the base and the app, and runs each forwarded request through the app in-process
  (plain ASGI), so the OpenAI routes, limits and error bodies are exactly the single server's. Its
  multiplexed loader keeps an LRU of at most K diffs: a diff is loaded from a ``DiffSource`` on first use
  and unloaded when the LRU evicts it and no request still uses it.

Ray is imported only when a Ray app is built or run; the rest of sparseft never needs it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import ConfigError, DiffRegistryError, InvalidModelError, SparseFTError, UnknownDiffError
from .app import ServeContext, ServeLimits, as_api_error
from .protocol import error_body
from .registry import NAME_PATTERN, REGISTRY_FILE, parse_model_id, read_registry_file
from .server import EngineOptions, build_app

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-sparseft-replica"  # which replica answered
HELD_HEADER = "x-sparseft-replica-diffs"  # the diffs that replica holds after answering, comma-separated
ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions")  # the routes whose body's `model` picks the replica
HOP_HEADERS = {b"content-length", b"transfer-encoding", b"connection"}


@dataclass
class RayOptions:
    """How the app scales out: replicas, the per-replica LRU of diffs, CPUs and torch threads per replica."""

    replicas: int = 2
    max_diffs_per_replica: int = 4
    replica_cpus: float = 1.0
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"replicas must be >= 1, got {self.replicas}")
        if self.max_diffs_per_replica < 1:
            raise ConfigError(f"max_diffs_per_replica must be >= 1, got {self.max_diffs_per_replica}")
        if not self.replica_cpus >= 0:  # NaN too
            raise ConfigError(f"replica_cpus must be >= 0, got {self.replica_cpus}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")


@dataclass
class DiffSource:
    """Where a replica finds the diff NAME, read only: a ``--diff NAME=DIR``, else the current version of NAME
    in a registry directory, else ``ROOT/NAME`` in a directory of diffs."""

    named: dict[str, str] = field(default_factory=dict)
    root: str | None = None
    registry_dir: str | None = None

    def __post_init__(self) -> None:
        places = [(f"--diff {n}={d}", d) for n, d in self.named.items()]
        places += [(f"--diff-dir {self.root}", self.root), (f"--registry {self.registry_dir}", self.registry_dir)]
        for flag, directory in places:
            if directory is not None and not Path(directory).is_dir():
                raise ConfigError(f"{flag}: not a directory")

    def path(self, name: str) -> Path:
        """The directory holding NAME's diff; UnknownDiffError when no source has it."""
        if not NAME_PATTERN.fullmatch(name):
            raise UnknownDiffError(f"the model `{name}` does not exist (not a valid diff name)")
        if name in self.named:
            return Path(self.named[name])
        stored = self._registry_path(name)
        if stored is not None:
            return stored
        if self.root is not None and (Path(self.root) / name).is_dir():
            return Path(self.root) / name
        raise UnknownDiffError(f"the model `{name}` does not exist (no diff named {name!r} in {self.describe()})")

    def describe(self) -> str:
        places = [f"--diff {n}=..." for n in sorted(self.named)]
        places += [f"registry {self.registry_dir}"] if self.registry_dir else []
        places += [f"diff directory {self.root}"] if self.root else []
        return ", ".join(places) or "no diff source (give --diff-dir, --registry or --diff)"

    def _registry_path(self, name: str) -> Path | None:
        if self.registry_dir is None or not (Path(self.registry_dir) / REGISTRY_FILE).is_file():
            return None
        file = Path(self.registry_dir) / REGISTRY_FILE
        entry = read_registry_file(file)["diffs"].get(name)
        if entry is None:
            return None
        for record in entry["versions"]:
            if isinstance(record, dict) and record.get("version") == entry["current"] and record.get("path"):
                return Path(self.registry_dir) / record["path"]
        raise DiffRegistryError(f"{file}: diffs.{name}: no version {entry['current']!r} with a 'path' (its current)")


@dataclass(frozen=True)
class ForwardedRequest:
    """What the router passes to a replica: one HTTP request, body read in full."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


# ---------------------------------------------------------------- the replica


class HeldDiff:
    """A diff as Ray's multiplexing LRU holds it on a replica.

    Ray calls ``model.__del__()`` when its LRU evicts a model. Here that is an instance attribute, not a
    method, so only an eviction unloads the diff (garbage collection at shutdown does not).
    """

    def __init__(self, name: str, on_evict):
        self.name = name
        self.__del__ = on_evict


class DiffReplica:
    """One replica: the base, the app from ``build_app``, and the diffs its multiplexing LRU keeps.

    ``load_diff`` is wrapped with ``serve.multiplexed`` by ``build_ray_app`` (the LRU size is a run-time
    option). A diff evicted while requests still use it is unloaded when the last of them finishes.
    """

    def __init__(self, model: str, source: DiffSource, served_name: str | None, dtype: str, device: str,
                 limits: ServeLimits, admin_token: str | None, threads: int | None,
                 engine: EngineOptions | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.app = build_app(model, served_name=served_name, dtype=dtype, device=device, limits=limits,
                             admin_token=admin_token, **(engine or EngineOptions()).as_kwargs())
        self.ctx: ServeContext = self.app.state.serve
        self.ctx.engine.start()  # the app's lifespan does not run in-process
        self.source = source
        self._changes = asyncio.Lock()  # loads and unloads of diffs, one at a time
        self._in_flight: Counter[str] = Counter()
        self._evicted: set[str] = set()  # evicted by the LRU, still in use
        self._pending: set[asyncio.Task] = set()

    def __del__(self) -> None:
        if hasattr(self, "ctx"):  # __init__ got as far as the engine
            self.ctx.engine.stop()

    @functools.cached_property
    def replica_id(self) -> str:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id

    async def load_diff(self, name: str) -> HeldDiff:
        """Make NAME loaded in this replica's registry (Ray's multiplexed loader)."""
        async with self._changes:
            if name in self._evicted:  # evicted but still in use: keep the loaded copy
                self._evicted.discard(name)
            elif name not in self.ctx.registry.names():
                await run_in_threadpool(self._load_from_source, name)
        return HeldDiff(name, functools.partial(self._evict, name))

    def _load_from_source(self, name: str) -> None:
        self.ctx.registry.load(name, self.source.path(name))
        self.ctx.metrics.diff_versions.set(self.ctx.registry.count_versions())

    async def _evict(self, name: str) -> None:
        self._evicted.add(name)
        await self._unload_if_idle(name)

    async def _unload_if_idle(self, name: str) -> None:
        async with self._changes:
            if self._in_flight[name] or name not in self._evicted:
                return
            self._evicted.discard(name)
            removed = await run_in_threadpool(self.ctx.registry.unload, name)
            for version in removed:
                await run_in_threadpool(self.ctx.engine.forget, version)
            self.ctx.metrics.diff_versions.set(self.ctx.registry.count_versions())

    def held_diffs(self) -> dict[str, Any]:
        """This replica's id and the diffs it holds now."""
        return {"replica": self.replica_id, "diffs": self.ctx.registry.names()}

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[dict | bytes]:
        """Answer one forwarded request: yields the response start ({status, headers}), then body chunks."""
        from ray import serve

        async for part in self.answer(serve.get_multiplexed_model_id(), request):
            yield part

    async def answer(self, name: str, request: ForwardedRequest) -> AsyncIterator[dict | bytes]:
        """``forward`` for the diff NAME ("" for no diff): load it if needed, hold it while the app answers."""
        if name:
            try:
                await self.load_diff(name)
            except SparseFTError as e:  # e.g. no such diff, or made for another base
                error = as_api_error(e)
                yield self._start(error.status, [(b"content-type", b"application/json")])
                yield json.dumps(error.body()).encode()
                return
            self._in_flight[name] += 1
        try:
            async for part in call_asgi(self.app, request):
                yield self._start(part["status"], part["headers"]) if isinstance(part, dict) else part
        finally:
            if name:
                self._release(name)

    def _release(self, name: str) -> None:
        self._in_flight[name] -= 1
        if not self._in_flight[name] and name in self._evicted:
            task = asyncio.ensure_future(self._unload_if_idle(name))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def _start(self, status: int, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
        ours = [(REPLICA_HEADER.encode(), self.replica_id.encode()),
                (HELD_HEADER.encode(), ",".join(self.ctx.registry.names()).encode())]
        return {"status": status, "headers": list(headers) + ours}


async def call_asgi(app, request: ForwardedRequest) -> AsyncIterator[dict | bytes]:
    """Run one request through an ASGI app in this process: yields {status, headers}, then body chunks."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
        "method": request.method, "path": request.path, "raw_path": request.path.encode(), "root_path": "",
        "query_string": request.query_string, "headers": request.headers,
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
    }
    messages: asyncio.Queue = asyncio.Queue()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect: a client that leaves cancels this whole call instead
        raise AssertionError("unreachable")

    async def run() -> None:
        try:
            await app(scope, receive, messages.put)
        finally:
            messages.put_nowait(None)

    task = asyncio.ensure_future(run())
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": list(message.get("headers", []))}
            elif message["type"] == "http.response.body" and message.get("body"):
                yield bytes(message["body"])
        await task  # the app's own failure, if any
    finally:
        task.cancel()


# ---------------------------------------------------------------- the router

class DiffRouter:
    """The HTTP ingress: forwards every request to a replica, picked by the body's `model` for completions.

    A plain ``__call__``, not ``serve.ingress(FastAPI)``: it has no routes of its own, and Serve's
    class-based FastAPI view left ``self`` unbound (a query parameter) with Ray 2.60 and FastAPI 0.165.
    """

    def __init__(self, replicas, base_name: str, max_body_bytes: int):
        self.replicas = replicas  # a DeploymentHandle to DiffReplica
        self.base_name = base_name
        self.max_body_bytes = max_body_bytes

    async def __call__(self, request: Request):
        """Every HTTP request that reaches Serve's proxy (any path, any method)."""
        if request.url.path.startswith("/admin/") and not is_read_only(request.method):
            return JSONResponse(error_body(
                "under Ray Serve diffs are not loaded through /admin: each replica loads them on demand from the "
                "diff source (--diff-dir, --registry or --diff); put the diff there instead",
                "invalid_request_error", "not_supported_under_ray"), status_code=501)
        body = await read_body(request, self.max_body_bytes)
        model = diff_name(request.method, request.url.path, body, self.base_name)
        try:
            version = parse_model_id(model)[1] if model is not None else None
        except InvalidModelError as e:  # 'a@x': the request's error; escaping the ingress it would be Serve's 500
            error = as_api_error(e)
            return JSONResponse(error.body(), status_code=error.status)
        if version is not None:
            return JSONResponse(error_body(
                f"the model `{model}` does not exist: under Ray Serve request a diff by its name (NAME@VERSION is "
                "not supported; each replica loads the source's current version)",
                "invalid_request_error", "model_not_found", "model"), status_code=404)
        handle = self.replicas.options(stream=True)
        if model is not None:
            handle = handle.options(multiplexed_model_id=model)
        forwarded = ForwardedRequest(request.method, request.url.path, request.url.query.encode(),
                                     list(request.headers.raw), body)
        parts = handle.forward.remote(forwarded)
        start = await parts.__anext__()
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"] if k.lower() not in HOP_HEADERS}
        return StreamingResponse(rest_of(parts), status_code=start["status"], headers=headers)


async def rest_of(parts) -> AsyncIterator[bytes]:
    async for chunk in parts:
        yield chunk


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read up to just past ``limit``: the replica's app answers 413 to anything longer."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            break
    return body


def is_read_only(http_method: str) -> bool:
    return http_method in ("GET", "HEAD")


def diff_name(http_method: str, path: str, body: bytes, base_name: str) -> str | None:
    """The diff a completion request's `model` names; None for the base, other routes or a body the app rejects."""
    if http_method != "POST" or path not in ROUTED_PATHS:
        return None
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
    return model if isinstance(model, str) and model and model != base_name else None


# ---------------------------------------------------------------- building and running


def build_ray_app(
    model: str,
    source: DiffSource,
    served_name: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    limits: ServeLimits | None = None,
    admin_token: str | None = None,
    options: RayOptions | None = None,
    engine: EngineOptions | None = None,
):
    """The Ray Serve application: ``options.replicas`` DiffReplica behind one DiffRouter, each replica's engine
    run as ``engine`` says (strategy, batch limits, unverified diffs, a quantized base: each replica quantizes
    its own copy of ``model``).

    Example:
        >>> app = build_ray_app("smollm2-135m", DiffSource(root="diffs"), options=RayOptions(replicas=2))  # doctest: +SKIP
        >>> serve.run(app)  # doctest: +SKIP
    """
    from ray import serve

    limits, options = limits or ServeLimits(), options or RayOptions()
    multiplexed = serve.multiplexed(max_num_models_per_replica=options.max_diffs_per_replica)
    replica_class = type("DiffReplica", (DiffReplica,), {"load_diff": multiplexed(DiffReplica.load_diff)})
    replicas = serve.deployment(
        replica_class, name="DiffReplica", num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.replica_cpus},
    ).bind(model, source, served_name, dtype, device, limits, admin_token, options.threads, engine)
    router = serve.deployment(DiffRouter, name="DiffRouter",
                              ray_actor_options={"num_cpus": 0})
    return router.bind(replicas, served_name or str(model), limits.max_body_bytes)


def app_builder(args: dict[str, Any]):
    """For ``serve run sparseft.serve.ray_app:app_builder model=DIR diff_dir=DIR replicas=2 strategy=mixed ...``
    (``quantize=nf4``: the replicas serve a quantized base, see ``EngineOptions``; ``quantize_skip='*.down_proj'``
    leaves those layers unquantized, comma-separated as ``--quantize-skip``)."""
    options = RayOptions(replicas=int(args.get("replicas", 2)),
                         max_diffs_per_replica=int(args.get("max_diffs_per_replica", 4)),
                         replica_cpus=float(args.get("replica_cpus", 1.0)))
    tokens = args.get("max_batch_tokens")
    engine = EngineOptions(strategy=args.get("strategy", "auto"), max_batch_size=int(args.get("max_batch_size", 16)),
                           max_batch_tokens=int(tokens) if tokens is not None else None,
                           allow_unverified_base=is_true(args.get("allow_unverified_base", False)),
                           quantize=args.get("quantize") or None, quantize_skip=args.get("quantize_skip") or ())
    source = DiffSource(root=args.get("diff_dir"), registry_dir=args.get("registry"))
    return build_ray_app(args["model"], source, served_name=args.get("served_name"),
                         dtype=args.get("dtype", "float32"), device=args.get("device", "cpu"), options=options,
                         engine=engine)


def is_true(value: Any) -> bool:
    """A key=value switch from Serve's launcher: true/1/yes (any case), or a real bool."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ConfigError(f"expected true or false, got {value!r}")


def interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


# Serve's controller kills its HTTP proxy when three readiness checks of 5 s each fail; a proxy importing
# its web stack on a busy 2-core machine took longer, so Serve never started. 20 s a check (three make
# Serve's own 60 s wait for the proxy) unless the environment sets its own.
PROXY_READY_CHECK_S = "20"


def allow_slow_proxy_start() -> None:
    """Before ``ray.init``: Ray's processes inherit the variable (a cluster joined with RAY_ADDRESS keeps its own)."""
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", PROXY_READY_CHECK_S)


# How long start_serve waits for the proxy's port after Serve's own fixed 60 s wait has run out.
PROXY_EXTRA_WAIT_S = 180.0


def start_serve(host: str, port: int, extra_wait_s: float = PROXY_EXTRA_WAIT_S) -> None:
    """``serve.start`` on host:port. Serve waits a fixed 60 s for its HTTP proxy and raises TimeoutError
    after, with the controller and the starting proxy left running; on a machine busy enough for that
    (seen with both cores of a 2-core machine taken) connect to that controller and wait for the proxy's
    port a while longer instead of giving up."""
    from ray import serve

    options = {"host": host, "port": port}
    try:
        serve.start(http_options=options)
        return
    except TimeoutError as e:
        log.warning("%s; waiting up to %.0f s more for Serve's HTTP proxy on %s:%d", e, extra_wait_s, host, port)
    serve.start(http_options=options)  # the controller exists now: this connects to it
    wait_for_port(host, port, extra_wait_s)


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    """Return once host:port accepts a TCP connection; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"Serve's HTTP proxy did not open {host}:{port} within {timeout_s:.0f} s more")
            time.sleep(0.5)


def run_ray(app, host: str, port: int) -> None:
    """Start (or join, with RAY_ADDRESS) a Ray cluster, serve ``app`` on host:port until Ctrl-C or SIGTERM,
    then shut Serve and Ray down (a plain SIGTERM would leave Ray's agent processes behind)."""
    import ray
    from ray import serve

    allow_slow_proxy_start()
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    signal.signal(signal.SIGTERM, interrupt)  # after ray.init, which installs a SIGTERM handler of its own
    try:
        start_serve(host, port)
        serve.run(app, name="sparseft", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how this server is meant to stop
    finally:
        serve.shutdown()
        ray.shutdown()
