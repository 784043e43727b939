"""The server over HTTP: a tiny model and two diffs on a loopback port, called with httpx."""

from __future__ import annotations

import asyncio
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from conftest import make_tiny_llama
from serve_fixtures import LiveServer, make_diff, reference, save_base
from sparseft.serve import Engine, ServeLimits, build_app

BASE = "tiny-base"
MAX_TOKENS = 12
PROMPTS = ["w10 w20 w30", "w40 w41 w42 w43", "w100 w7"]
LIMITS = ServeLimits(max_body_bytes=4096, max_tokens=32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = save_base(root / "tiny-base")
    return {
        "root": root,
        "model": model_dir,
        "alpha": make_diff(root / "alpha", seed=1),
        "beta": make_diff(root / "beta", seed=2),
        "foreign": make_diff(root / "foreign", seed=3, base_seed=7),  # made for another base
        "tokenizer": AutoTokenizer.from_pretrained(model_dir),
    }


@pytest.fixture(scope="module")
def refs(files):
    """Offline greedy text for every (model, prompt): the base, alpha and beta."""
    tok = files["tokenizer"]
    out = {}
    for name, diff_dir in ((BASE, None), ("alpha", files["alpha"]), ("beta", files["beta"])):
        for prompt in PROMPTS:
            out[name, prompt] = reference(files["model"], diff_dir, tok(prompt)["input_ids"], MAX_TOKENS)
    return out


@pytest.fixture(scope="module")
def server(files):
    app = build_app(str(files["model"]), [("alpha", str(files["alpha"])), ("beta", str(files["beta"]))],
                    registry_dir=files["root"] / "registry", served_name=BASE, limits=LIMITS)
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def complete(client, model, prompt, **extra):
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream_events(client, path, body):
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def assert_openai_error(r, status, code=None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


# ---------------------------------------------------------------- outputs


def test_the_references_differ(refs):
    # Guards the tests below: if the diffs did not change the output, "equals its own diff" would prove nothing.
    for prompt in PROMPTS:
        assert len({refs[BASE, prompt], refs["alpha", prompt], refs["beta", prompt]}) == 3


def test_models_lists_base_diffs_and_versions(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids[0] == BASE
    assert {"alpha", "alpha@1", "beta", "beta@1"} <= set(ids)


@pytest.mark.parametrize("model", [BASE, "alpha", "beta", "alpha@1"])
def test_completion_equals_offline_sparse_model(client, refs, model):
    for prompt in PROMPTS:
        body = complete(client, model, prompt)
        assert body["choices"][0]["text"] == refs[model.split("@")[0], prompt]
        assert body["object"] == "text_completion"
        assert body["model"] == (BASE if model == BASE else model.split("@")[0] + "@1")
        assert body["usage"]["prompt_tokens"] == len(prompt.split())


def test_chat_equals_offline_sparse_model(client, files):
    tok = files["tokenizer"]
    messages = [{"role": "system", "content": "w9 w8"}, {"role": "user", "content": "w50 w51"}]
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    expected = reference(files["model"], files["beta"], ids["input_ids"], MAX_TOKENS)
    r = client.post("/v1/chat/completions", json={"model": "beta", "messages": messages, "max_tokens": MAX_TOKENS,
                                                   "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert choice["finish_reason"] in ("stop", "length")


def test_streaming_completion_and_chat(client, refs):
    prompt = PROMPTS[0]
    events = stream_events(client, "/v1/completions",
                           {"model": "alpha", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events) == refs["alpha", prompt]
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")

    events = stream_events(client, "/v1/chat/completions", {
        "model": BASE, "messages": [{"role": "user", "content": "w60"}], "max_tokens": 6, "temperature": 0, "stream": True,
    })
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_string_cuts_the_text(client, refs):
    full = refs["beta", PROMPTS[1]]
    words = full.split()
    assert len(words) >= 3
    body = complete(client, "beta", PROMPTS[1], stop=[words[2]])
    cut = full[: full.find(words[2])]
    assert body["choices"][0]["text"] == cut
    assert body["choices"][0]["finish_reason"] == "stop"


def test_concurrent_interleaved_requests_get_their_own_diff(server, refs):
    jobs = [(model, prompt, stream) for model in (BASE, "alpha", "beta") for prompt in PROMPTS for stream in (False, True)]
    jobs = jobs * 2
    # Interleave models so consecutive arrivals need different weights.
    jobs.sort(key=lambda j: (PROMPTS.index(j[1]), j[2]))

    def call(job):
        model, prompt, stream = job
        with httpx.Client(base_url=server.url, timeout=120) as c:
            body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
            if stream:
                return "".join(e["choices"][0]["text"] for e in stream_events(c, "/v1/completions", body))
            return complete(c, model, prompt, stream=False)["choices"][0]["text"]

    swaps_before = server.app.state.engine.swaps
    with ThreadPoolExecutor(max_workers=12) as pool:
        texts = list(pool.map(call, jobs))
    for (model, prompt, _), text in zip(jobs, texts):
        assert text == refs[model, prompt], (model, prompt)
    # Grouping by diff: never more swaps than requests (each one needs at most one); the batching engine of
    # `auto` may swap when a request joins and when one leaves.
    per_request = 1 if server.app.state.engine.__class__ is Engine else 2
    assert server.app.state.engine.swaps - swaps_before <= per_request * len(jobs)


# ---------------------------------------------------------------- registry


def test_rollback_switches_outputs(client, files, refs):
    prompt = PROMPTS[2]
    r = client.post("/admin/diffs", json={"name": "gamma", "path": str(files["alpha"])})
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1
    r = client.post("/admin/diffs", json={"name": "gamma", "path": str(files["beta"])})
    assert r.json()["version"] == 2 and r.json()["current"]
    assert complete(client, "gamma", prompt)["choices"][0]["text"] == refs["beta", prompt]

    r = client.post("/admin/diffs/gamma/rollback")
    assert r.status_code == 200 and r.json()["version"] == 1
    body = complete(client, "gamma", prompt)
    assert body["choices"][0]["text"] == refs["alpha", prompt] and body["model"] == "gamma@1"
    assert complete(client, "gamma@2", prompt)["choices"][0]["text"] == refs["beta", prompt]

    assert_openai_error(client.post("/admin/diffs/gamma/rollback"), 400, "diff_registry")
    r = client.post("/admin/diffs/gamma/rollback", json={"version": 2})
    assert r.status_code == 200 and complete(client, "gamma", prompt)["choices"][0]["text"] == refs["beta", prompt]

    assert client.delete("/admin/diffs/gamma").json()["unloaded_versions"] == [1, 2]
    assert_openai_error(client.post("/v1/completions", json={"model": "gamma", "prompt": prompt}), 404, "model_not_found")


def test_admin_routes_run_registry_writes_off_the_event_loop(server, client, files, monkeypatch):
    """unload and rollback write registry.json and delete files: like load, they run in the thread pool."""
    registry, on_loop = server.app.state.registry, {}

    def spy(method):
        def call(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                on_loop[method.__name__] = True
            except RuntimeError:  # no loop in this thread: a worker thread
                on_loop[method.__name__] = False
            return method(*args, **kwargs)
        return call

    for name in ("load", "rollback", "unload"):
        monkeypatch.setattr(registry, name, spy(getattr(registry, name)))
    for path in (files["alpha"], files["beta"]):
        assert client.post("/admin/diffs", json={"name": "delta", "path": str(path)}).status_code == 201
    assert client.post("/admin/diffs/delta/rollback").json()["version"] == 1
    assert client.delete("/admin/diffs/delta").json()["unloaded_versions"] == [1, 2]
    assert on_loop == {"load": False, "rollback": False, "unload": False}


def test_loading_a_diff_for_another_base_is_refused(client, files):
    before = client.get("/v1/models").json()
    error = assert_openai_error(client.post("/admin/diffs", json={"name": "foreign", "path": str(files["foreign"])}),
                                400, "fingerprint_mismatch")
    assert "different base model" in error["message"]
    assert_openai_error(client.post("/admin/diffs", json={"name": "x", "path": str(files["root"] / "nope")}),
                        400, "diff_not_found")
    assert_openai_error(client.post("/admin/diffs", json={"name": "a@b", "path": str(files["alpha"])}), 400)
    assert_openai_error(client.post("/admin/diffs", json={"name": BASE, "path": str(files["alpha"])}), 400)
    assert client.get("/v1/models").json()["data"] == before["data"]


def test_registry_survives_restart(files, refs):
    registry = files["root"] / "registry-restart"
    prompt = PROMPTS[0]
    first = build_app(str(files["model"]), [("alpha", str(files["alpha"]))], registry_dir=registry, served_name=BASE)
    with LiveServer(first) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        assert c.post("/admin/diffs", json={"name": "alpha", "path": str(files["beta"])}).json()["version"] == 2
        assert c.post("/admin/diffs/alpha/rollback").json()["version"] == 1
    assert json.loads((registry / "registry.json").read_text())["diffs"]["alpha"]["current"] == 1

    # The sources may go away: the registry serves its own copies. Restarting with the same --diff adds nothing.
    shutil.copytree(files["beta"], files["root"] / "beta-moved")
    second = build_app(str(files["model"]), [("alpha", str(files["alpha"]))], registry_dir=registry, served_name=BASE)
    with LiveServer(second) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        listing = c.get("/admin/diffs").json()["diffs"]
        assert listing == [{"name": "alpha", "current": 1, "versions": listing[0]["versions"]}]
        assert [v["version"] for v in listing[0]["versions"]] == [1, 2]
        assert complete(c, "alpha", prompt)["choices"][0]["text"] == refs["alpha", prompt]
        assert complete(c, "alpha@2", prompt)["choices"][0]["text"] == refs["beta", prompt]


# ---------------------------------------------------------------- bad input


def test_unknown_model_is_404_in_openai_shape(client):
    error = assert_openai_error(client.post("/v1/completions", json={"model": "nope", "prompt": "w9"}), 404,
                                "model_not_found")
    assert error["type"] == "invalid_request_error" and "nope" in error["message"]
    assert_openai_error(client.post("/v1/completions", json={"model": "alpha@9", "prompt": "w9"}), 404, "model_not_found")
    assert_openai_error(client.post("/v1/chat/completions", json={"model": "nope", "messages": [
        {"role": "user", "content": "w9"}]}), 404)


@pytest.mark.parametrize("body", [
    b"{not json",
    json.dumps({"prompt": "w9"}).encode(),                                  # no model
    json.dumps({"model": "alpha", "prompt": "w9", "max_tokens": "many"}).encode(),
    json.dumps({"model": "alpha", "prompt": "w9", "max_tokens": 0}).encode(),
    json.dumps({"model": "alpha", "prompt": "w9", "n": 2}).encode(),
    json.dumps({"model": "alpha", "prompt": "w9", "temperature": -1}).encode(),
    json.dumps({"model": "alpha", "prompt": [1, 999]}).encode(),            # token id outside the vocabulary
    json.dumps({"model": "alpha", "prompt": ""}).encode(),                  # nothing to continue
])
def test_malformed_body_is_400(client, body):
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)


def test_limits_give_413_and_400(client):
    big = " ".join(["w9"] * 2000)  # ~6 KB, over the 4 KB body limit
    assert_openai_error(client.post("/v1/completions", json={"model": "alpha", "prompt": big}), 413, "body_too_large")
    error = assert_openai_error(client.post("/v1/completions", json={"model": "alpha", "prompt": "w9", "max_tokens": 33}),
                                400, "max_tokens_exceeded")
    assert error["param"] == "max_tokens"
    long_prompt = " ".join(["w9"] * 120)  # 120 + 16 tokens > the tiny model's context of 128
    assert_openai_error(client.post("/v1/completions", json={"model": "alpha", "prompt": long_prompt}), 400,
                        "context_length_exceeded")


@pytest.mark.parametrize("strategy", ["merged", "auto", "mixed"])
def test_a_crashed_request_leaves_the_weights_unmodified(files, refs, strategy):
    app = build_app(str(files["model"]), [("alpha", str(files["alpha"]))], served_name=BASE, limits=LIMITS,
                    strategy=strategy)
    engine = app.state.engine
    forwards = {"left": None}

    def crash_half_way(module, inputs, output):  # the model fails on its third forward of the armed request
        if forwards["left"] is not None:
            forwards["left"] -= 1
            if forwards["left"] == 0:
                forwards["left"] = None
                raise RuntimeError("simulated failure half-way through decoding")

    engine.model.lm_head.register_forward_hook(crash_half_way)
    pristine = make_tiny_llama().state_dict()
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        forwards["left"] = 3
        error = assert_openai_error(client.post("/v1/completions", json={
            "model": "alpha", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}), 500)
        assert error["type"] == "server_error" and "simulated failure" in error["message"]
        assert engine.merged is None
        for name, tensor in engine.model.state_dict().items():
            assert torch.equal(tensor, pristine[name]), name
        assert complete(client, "alpha", PROMPTS[0])["choices"][0]["text"] == refs["alpha", PROMPTS[0]]


# ---------------------------------------------------------------- operators


def test_health_and_metrics(client):
    complete(client, "beta", PROMPTS[0])
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    text = client.get("/metrics").text
    assert 'sparseft_requests_total{diff="beta",endpoint="/v1/completions",version="1"}' in text
    assert 'sparseft_request_latency_seconds_bucket{diff="beta",le="0.005",version="1"}' in text
    assert 'sparseft_completion_tokens_total{diff="beta",version="1"}' in text
    assert "sparseft_swaps_total" in text and "sparseft_swap_seconds_count" in text
    assert 'sparseft_request_errors_total{endpoint="/v1/completions",status="404"}' in text


def test_admin_routes_need_the_token_when_one_is_set(files):
    app = build_app(str(files["model"]), served_name=BASE, admin_token="s3cret")
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        body = {"name": "alpha", "path": str(files["alpha"])}
        assert_openai_error(c.post("/admin/diffs", json=body), 401, "invalid_admin_token")
        assert_openai_error(c.get("/admin/diffs", headers={"Authorization": "Bearer wrong"}), 401)
        assert c.post("/admin/diffs", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 201
        assert c.get("/v1/models").status_code == 200  # the OpenAI routes stay open
