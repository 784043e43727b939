"""The Ray Serve layer's parts that need no Ray: where a replica finds a diff, which model the router routes by,
the in-process ASGI call, and a replica's load on demand / unload on eviction once no request uses the diff."""

from __future__ import annotations

import asyncio
import json

import pytest
from transformers import AutoTokenizer

from serve_fixtures import make_diff, reference, save_base
from sparseft.cli import build_parser, main
from sparseft.errors import ConfigError, DiffRegistryError, UnknownDiffError
from sparseft.serve import DiffRegistry, ServeLimits
from sparseft.serve.ray_app import (
    HELD_HEADER,
    DiffReplica,
    DiffSource,
    DiffRouter,
    ForwardedRequest,
    RayOptions,
    call_asgi,
    diff_name,
)

BASE = "tiny-base"
PROMPT = "w10 w20 w30"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-ray-parts")
    model_dir = save_base(root / "tiny-base")
    make_diff(root / "diffs" / "alpha", seed=1)
    make_diff(root / "diffs" / "beta", seed=2)
    return {"root": root, "model": model_dir, "diffs": root / "diffs"}


def completion(model: str, max_tokens: int = 6) -> ForwardedRequest:
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return ForwardedRequest("POST", "/v1/completions", b"", headers, body)


async def collect(parts) -> tuple[dict, bytes]:
    start, body = None, b""
    async for part in parts:
        if isinstance(part, dict):
            start = part
        else:
            body += part
    return start, body


# ---------------------------------------------------------------- source and routing


def test_diff_source_prefers_named_then_registry_then_root(files, tmp_path):
    registry_dir = tmp_path / "registry"
    registry = DiffRegistry(lambda diff, where: {}, directory=registry_dir)  # entries are not checked here
    registry.load("alpha", files["diffs"] / "beta")  # the registry's alpha is beta's files
    source = DiffSource(named={"beta": str(files["diffs"] / "alpha")}, root=str(files["diffs"]),
                        registry_dir=str(registry_dir))
    assert source.path("beta") == files["diffs"] / "alpha"
    assert source.path("alpha") == registry_dir / "diffs" / "alpha" / "v1"
    assert DiffSource(root=str(files["diffs"])).path("alpha") == files["diffs"] / "alpha"


@pytest.mark.parametrize("name", ["gamma", "../diffs/alpha", "alpha/..", ".hidden"])
def test_diff_source_rejects_unknown_and_path_like_names(files, name):
    with pytest.raises(UnknownDiffError, match="does not exist"):
        DiffSource(root=str(files["diffs"])).path(name)


def test_diff_source_names_a_broken_registry_file(tmp_path):
    (tmp_path / "registry.json").write_text("{not json")
    with pytest.raises(DiffRegistryError, match="registry.json"):
        DiffSource(registry_dir=str(tmp_path)).path("alpha")


def test_router_routes_by_the_body_model_of_completions_only():
    body = json.dumps({"model": "alpha", "prompt": "x"}).encode()
    assert diff_name("POST", "/v1/completions", body, BASE) == "alpha"
    assert diff_name("POST", "/v1/chat/completions", body, BASE) == "alpha"
    assert diff_name("POST", "/v1/completions", json.dumps({"model": BASE}).encode(), BASE) is None
    assert diff_name("GET", "/v1/models", b"", BASE) is None
    assert diff_name("POST", "/admin/diffs", body, BASE) is None
    for bad in (b"{not json", b"[1, 2]", b'{"model": 3}', b""):
        assert diff_name("POST", "/v1/completions", bad, BASE) is None  # the app answers 400


@pytest.mark.parametrize("model", ["a@x", "a@", "a@-1"])
def test_router_answers_a_malformed_model_version_400_before_any_replica(model):
    from starlette.requests import Request

    body = json.dumps({"model": model, "prompt": "x"}).encode()

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
             "headers": [(b"content-type", b"application/json")]}
    router = DiffRouter(replicas=None, base_name=BASE, max_body_bytes=1 << 20)  # no replica is asked
    response = asyncio.run(router(Request(scope, receive)))
    error = json.loads(response.body)["error"]
    assert response.status_code == 400 and error["param"] == "model" and error["code"] == "invalid_model"
    assert "must be a version number" in error["message"]


def test_options_reject_nonsense():
    with pytest.raises(ConfigError, match="replicas"):
        RayOptions(replicas=0)
    with pytest.raises(ConfigError, match="max_diffs_per_replica"):
        RayOptions(max_diffs_per_replica=0)


def test_call_asgi_yields_the_start_then_the_streamed_body():
    async def app(scope, receive, send):
        request = await receive()
        await send({"type": "http.response.start", "status": 201, "headers": [(b"x-path", scope["path"].encode())]})
        await send({"type": "http.response.body", "body": request["body"], "more_body": True})
        await send({"type": "http.response.body", "body": b"!", "more_body": False})

    parts = asyncio.run(collect(call_asgi(app, ForwardedRequest("POST", "/p", b"", [], b"hello"))))
    assert parts == ({"status": 201, "headers": [(b"x-path", b"/p")]}, b"hello!")


# ---------------------------------------------------------------- a replica without Ray


@pytest.fixture
def replica(files):
    r = DiffReplica(str(files["model"]), DiffSource(root=str(files["diffs"])), BASE, "float32", "cpu",
                    ServeLimits(max_tokens=16), None, 1)
    r.replica_id = "r0"  # outside Ray there is no replica context
    yield r
    r.ctx.engine.stop()


def test_replica_loads_a_diff_on_first_use_and_answers_like_offline(replica, files):
    assert replica.ctx.registry.names() == []
    start, body = asyncio.run(collect(replica.answer("alpha", completion("alpha"))))
    ids = AutoTokenizer.from_pretrained(files["model"])(PROMPT)["input_ids"]
    assert start["status"] == 200 and dict(start["headers"])[HELD_HEADER.encode()] == b"alpha"
    assert json.loads(body)["choices"][0]["text"] == reference(files["model"], files["diffs"] / "alpha", ids, 6)
    assert replica.held_diffs() == {"replica": "r0", "diffs": ["alpha"]}


def test_an_unknown_diff_is_answered_404_in_openai_shape(replica):
    start, body = asyncio.run(collect(replica.answer("gamma", completion("gamma"))))
    assert start["status"] == 404 and json.loads(body)["error"]["code"] == "model_not_found"
    assert replica.ctx.registry.names() == []


def test_eviction_waits_for_the_requests_using_the_diff(replica):
    async def scenario():
        held = await replica.load_diff("alpha")
        request = replica.answer("alpha", completion("alpha"))
        start = await request.__anext__()  # the request holds alpha now
        await held.__del__()  # what Ray's LRU calls on eviction
        still_loaded = replica.ctx.registry.names()
        _, body = await collect(request)
        await asyncio.gather(*replica._pending)
        return start, body, still_loaded

    start, body, still_loaded = asyncio.run(scenario())
    assert start["status"] == 200 and json.loads(body)["choices"][0]["text"]
    assert still_loaded == ["alpha"]  # not unloaded under a running request
    assert replica.ctx.registry.names() == []  # unloaded once it finished
    assert replica.ctx.engine.merged is None  # and the base restored


def test_a_diff_evicted_in_use_and_asked_for_again_is_kept(replica):
    async def scenario():
        held = await replica.load_diff("alpha")
        request = replica.answer("alpha", completion("alpha"))
        await request.__anext__()
        await held.__del__()
        await replica.load_diff("alpha")  # the LRU takes it back before the request ends
        await collect(request)
        await asyncio.gather(*replica._pending)

    asyncio.run(scenario())
    assert [v.version for v in replica.ctx.registry.versions("alpha")] == [1]  # kept, not loaded twice


def test_evicting_an_idle_diff_unloads_it_at_once(replica, files):
    async def scenario():
        held = await replica.load_diff("beta")
        await replica.load_diff("alpha")
        await held.__del__()

    asyncio.run(scenario())
    assert replica.ctx.registry.names() == ["alpha"]


def test_diff_source_rejects_a_missing_directory(tmp_path):
    with pytest.raises(ConfigError, match="--diff-dir .*not a directory"):
        DiffSource(root=str(tmp_path / "nowhere"))


# ---------------------------------------------------------------- the command line


def test_ray_flags_parse():
    args = build_parser().parse_args(["serve", "--model", "m", "--ray", "--replicas", "3", "--diff-dir", "d",
                                      "--max-diffs-per-replica", "2"])
    assert args.ray and args.replicas == 3 and args.diff_dir == "d" and args.max_diffs_per_replica == 2


def test_ray_only_flags_without_ray_are_an_error(capsys):
    assert main(["serve", "--model", "m", "--replicas", "2", "--diff-dir", "d"]) != 0
    assert "--diff-dir, --replicas only apply with --ray" in capsys.readouterr().err


# ---------------------------------------------------------------- engine options reach every replica


class FakeEngine:
    def start(self):
        pass

    def stop(self):
        pass


def fake_build_app(calls: list):
    """A stand-in for ``build_app`` that records what it was given and builds nothing."""
    from types import SimpleNamespace

    def build(model, **kwargs):
        calls.append(kwargs)
        return SimpleNamespace(state=SimpleNamespace(serve=SimpleNamespace(engine=FakeEngine())))

    return build


def test_a_replica_builds_its_app_with_the_engine_options(monkeypatch, files):
    import sparseft.serve.ray_app as ray_app
    from sparseft.serve.server import EngineOptions

    calls: list = []
    monkeypatch.setattr(ray_app, "build_app", fake_build_app(calls))
    engine = EngineOptions(strategy="mixed", max_batch_size=3, max_batch_tokens=99, allow_unverified_base=True)
    DiffReplica(str(files["model"]), DiffSource(), BASE, "float32", "cpu", ServeLimits(), None, None, engine)
    assert {k: calls[0][k] for k in ("strategy", "max_batch_size", "max_batch_tokens", "allow_unverified_base")} == {
        "strategy": "mixed", "max_batch_size": 3, "max_batch_tokens": 99, "allow_unverified_base": True}


def test_serve_ray_passes_the_engine_flags_to_the_replicas(monkeypatch, files):
    pytest.importorskip("ray.serve")  # the verb checks the extra is installed before building anything
    import sparseft.serve.ray_app as ray_app
    from sparseft.serve.server import EngineOptions

    built: dict = {}
    monkeypatch.setattr(ray_app, "build_ray_app", lambda model, source, **kwargs: built.update(kwargs) or "app")
    monkeypatch.setattr(ray_app, "run_ray", lambda app, host, port: None)
    assert main(["serve", "--model", "m", "--ray", "--diff-dir", str(files["diffs"]), "--strategy", "merged",
                 "--max-batch-size", "2", "--max-batch-tokens", "50", "--allow-unverified-base"]) == 0
    assert built["engine"] == EngineOptions(strategy="merged", max_batch_size=2, max_batch_tokens=50,
                                            allow_unverified_base=True)


def test_serve_run_app_builder_takes_the_engine_options(monkeypatch, files):
    import sparseft.serve.ray_app as ray_app
    from sparseft.serve.server import EngineOptions

    built: dict = {}
    monkeypatch.setattr(ray_app, "build_ray_app", lambda model, source, **kwargs: built.update(kwargs) or "app")
    ray_app.app_builder({"model": "m", "diff_dir": str(files["diffs"]), "strategy": "mixed", "max_batch_size": "4",
                         "max_batch_tokens": "64", "allow_unverified_base": "true"})
    assert built["engine"] == EngineOptions(strategy="mixed", max_batch_size=4, max_batch_tokens=64,
                                            allow_unverified_base=True)
    with pytest.raises(ConfigError, match="strategy must be one of"):
        ray_app.app_builder({"model": "m", "diff_dir": str(files["diffs"]), "strategy": "fast"})


def test_serve_start_waits_for_a_slow_proxy_past_serves_own_timeout(monkeypatch, caplog):
    """Serve's serve.start raises TimeoutError after a fixed 60 s for its HTTP proxy; start_serve then connects to
    the controller left running and waits for the proxy's port, which opens later."""
    import socket
    import threading

    ray_serve = pytest.importorskip("ray.serve", reason="Ray Serve is an optional extra: pip install 'sparseft[ray]'")
    from sparseft.serve import ray_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    calls, proxy, proxy_comes_up = [], socket.socket(), [True]

    def start(http_options):
        calls.append(http_options)
        if len(calls) == 1:
            raise TimeoutError("HTTP proxies not available after 60s.")
        if proxy_comes_up[0]:  # a little later
            threading.Timer(0.8, lambda: (proxy.bind(("127.0.0.1", port)), proxy.listen())).start()

    monkeypatch.setattr(ray_serve, "start", start)
    try:
        ray_app.start_serve("127.0.0.1", port, extra_wait_s=30)
    finally:
        proxy.close()
    assert calls == [{"host": "127.0.0.1", "port": port}] * 2
    assert "waiting up to 30 s more for Serve's HTTP proxy" in caplog.text

    calls.clear()
    proxy_comes_up[0] = False
    with pytest.raises(TimeoutError, match=rf"did not open 127.0.0.1:{port} within 1 s more"):
        ray_app.start_serve("127.0.0.1", port, extra_wait_s=1)  # no proxy this time
