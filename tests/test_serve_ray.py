"""Scale-out on Ray Serve: a local Ray instance, 2 replicas of the tiny base, 3 diffs loaded on demand."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from transformers import AutoTokenizer

from serve_fixtures import make_diff, reference, save_base

ray = pytest.importorskip("ray", reason="Ray Serve is an optional extra: pip install 'sparseft[ray]'")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is an optional extra: pip install 'sparseft[ray]'")

from sparseft.serve.ray_app import (  # noqa: E402
    HELD_HEADER, REPLICA_HEADER, DiffSource, RayOptions, allow_slow_proxy_start, build_ray_app, start_serve,
)

pytestmark = pytest.mark.slow  # Ray's start-up: ~20 s on a busy 2-core box

BASE = "tiny-base"
DIFFS = ("alpha", "beta", "gamma")
PROMPT = "w10 w20 w30"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-ray")
    model_dir = save_base(root / "tiny-base")
    for seed, name in enumerate(DIFFS, start=1):
        make_diff(root / "diffs" / name, seed=seed)
    return {"model": model_dir, "diffs": root / "diffs"}


@pytest.fixture(scope="module")
def refs(files):
    """Offline greedy text of the base and of every diff, merged with SparseModel."""
    ids = AutoTokenizer.from_pretrained(files["model"])(PROMPT)["input_ids"]
    out = {BASE: reference(files["model"], None, ids, MAX_TOKENS)}
    for name in DIFFS:
        out[name] = reference(files["model"], files["diffs"] / name, ids, MAX_TOKENS)
    assert len(set(out.values())) == len(out), "the fixture diffs must answer differently"
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url(files):
    """A local Ray instance serving the app on a loopback port; Serve and Ray are always shut down after."""
    port = free_port()
    allow_slow_proxy_start()  # as `sparseft serve --ray` does: the proxy may start slowly on a busy machine
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        start_serve("127.0.0.1", port)  # as `sparseft serve --ray` does
        options = RayOptions(replicas=2, max_diffs_per_replica=len(DIFFS), replica_cpus=1, threads=1)
        serve.run(build_ray_app(str(files["model"]), DiffSource(root=str(files["diffs"])), served_name=BASE,
                                options=options), name="sparseft-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def complete(client, model: str) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r


def held_by(r: httpx.Response) -> set[str]:
    return set(filter(None, r.headers[HELD_HEADER].split(",")))


def test_two_replicas_load_diffs_on_demand_and_route_to_the_holder(ray_url, refs):
    held: dict[str, set[str]] = {}  # replica -> the diffs it reported holding after its last answer
    with httpx.Client(base_url=ray_url, timeout=60) as client:
        for round_ in range(2):
            for name in (*DIFFS, BASE):
                r = complete(client, name)
                replica = r.headers[REPLICA_HEADER]
                assert r.json()["choices"][0]["text"] == refs[name], (name, round_)
                if round_ == 1 and name != BASE:  # routed to the replica that loaded it in round 0
                    assert name in held.get(replica, set()), (name, replica, held)
                held[replica] = held_by(r)
                if name != BASE:
                    assert name in held[replica]
                if round_ == 0 and name != BASE:
                    # Replicas report their diffs to Serve's router in the background (every 0.1 s); without
                    # this pause the next new diff may be placed before the router knows this one's place.
                    time.sleep(1.0)
    assert len(held) == 2, held  # both replicas answered
    assert sorted(d for diffs in held.values() for d in diffs) == sorted(DIFFS)  # each diff on one replica only
    assert all(diffs != set(DIFFS) for diffs in held.values()), held  # neither was asked to hold every diff


def test_unknown_and_versioned_models_get_openai_errors(ray_url):
    with httpx.Client(base_url=ray_url, timeout=60) as client:
        missing = client.post("/v1/completions", json={"model": "nope", "prompt": PROMPT, "max_tokens": 2})
        versioned = client.post("/v1/completions", json={"model": "alpha@1", "prompt": PROMPT, "max_tokens": 2})
        admin = client.post("/admin/diffs", json={"name": "x", "path": "/tmp"})
        health = client.get("/health")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert "nope" in missing.json()["error"]["message"]
    assert versioned.status_code == 404 and "NAME@VERSION" in versioned.json()["error"]["message"]
    assert admin.status_code == 501 and admin.json()["error"]["code"] == "not_supported_under_ray"
    assert health.status_code == 200 and health.json()["model"] == BASE
