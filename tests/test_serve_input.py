"""Bad client input over the in-process app: always a 4xx in OpenAI's shape, counted in the metrics."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from conftest import make_tiny_llama
from serve_fixtures import make_diff, make_tokenizer
from sparseft.serve import DiffRegistry, Engine, ServeLimits, create_app

BASE = "tiny-base"


def make_app(**engine_options):
    engine = Engine(make_tiny_llama(), make_tokenizer(), **engine_options)
    registry = DiffRegistry(engine.validated_entries, reserved_names=(BASE,))
    return create_app(engine, registry, BASE, ServeLimits(max_body_bytes=4096, max_tokens=8))


@pytest.fixture(scope="module")
def client():
    with TestClient(make_app()) as c:  # unhandled exceptions would be raised here, not hidden as a 500
        yield c


def error_count(client, endpoint: str, status: int) -> float:
    text = client.get("/metrics").text
    pattern = rf'sparseft_request_errors_total\{{endpoint="{re.escape(endpoint)}",status="{status}"\}} (\S+)'
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


def assert_openai_400(r):
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    return error


@pytest.mark.parametrize("body", [
    {"model": "a@²", "prompt": "w9"},                        # '²'.isdigit() is True, int('²') fails
    {"model": BASE, "prompt": "\ud800 hi"},                  # a lone surrogate: no tokenizer takes it
    {"model": BASE, "messages": [{"role": "user", "content": "\udfff"}]},
    {"model": BASE, "prompt": "w9", "seed": 2**70},          # over torch.manual_seed's range
    {"model": BASE, "prompt": "w9", "temperature": 1e-45},   # logits / T overflow to inf
    {"model": BASE, "prompt": "w9", "stop": ["\ud800"]},
])
def test_bad_values_are_400_in_openai_shape_and_counted(client, body):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    before = error_count(client, path, 400)
    # json.dumps writes a lone surrogate as the escape "\ud800", as a client would send it.
    r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert_openai_400(r)
    assert error_count(client, path, 400) == before + 1


def test_a_tiny_nonzero_temperature_limit_still_samples(client):
    r = client.post("/v1/completions", json={"model": BASE, "prompt": "w9", "temperature": 1e-3, "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_every_error_response_is_counted_413_and_500_too(client, monkeypatch):
    before = error_count(client, "/v1/completions", 413)
    r = client.post("/v1/completions", json={"model": BASE, "prompt": " ".join(["w9"] * 2000)})
    assert r.status_code == 413
    assert error_count(client, "/v1/completions", 413) == before + 1

    import sparseft.serve.app as app_module

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(app_module, "check_budget", broken)
    before = error_count(client, "/v1/completions", 500)
    r = client.post("/v1/completions", json={"model": BASE, "prompt": "w9"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"  # JSON, not plain text
    assert error_count(client, "/v1/completions", 500) == before + 1


def test_admin_load_of_a_diff_without_fingerprint_is_refused_unless_allowed(tmp_path):
    diff = make_diff(tmp_path / "d", seed=1)
    meta = json.loads((diff / "sparse_config.json").read_text())
    del meta["base_fingerprint"]
    (diff / "sparse_config.json").write_text(json.dumps(meta))
    with TestClient(make_app()) as c:
        error = assert_openai_400(c.post("/admin/diffs", json={"name": "d", "path": str(diff)}))
        assert error["code"] == "unverified_base" and "base fingerprint" in error["message"]
    with TestClient(make_app(allow_unverified_base=True)) as c:
        assert c.post("/admin/diffs", json={"name": "d", "path": str(diff)}).status_code == 201


@pytest.mark.parametrize("fingerprint", [{"float32": 123}, None, ["x"], "x"])
def test_admin_load_of_a_mistyped_config_is_a_json_400(client, tmp_path, fingerprint):
    diff = make_diff(tmp_path / "d", seed=1)
    meta = json.loads((diff / "sparse_config.json").read_text())
    meta["base_fingerprint"] = fingerprint
    (diff / "sparse_config.json").write_text(json.dumps(meta))
    error = assert_openai_400(client.post("/admin/diffs", json={"name": "d", "path": str(diff)}))
    assert "base_fingerprint" in error["message"]


def test_admin_load_of_a_nul_path_is_400(client):
    assert_openai_400(client.post("/admin/diffs", json={"name": "d", "path": "/tmp/a\u0000b"}))


@pytest.mark.parametrize("model", ["a@x", "a@", "a@-1", "a@²"])
def test_a_malformed_model_version_is_400_naming_the_model_field(client, model):
    error = assert_openai_400(client.post("/v1/completions", json={"model": model, "prompt": "w9"}))
    assert error["param"] == "model" and "must be a version number" in error["message"], error


@pytest.mark.parametrize("body, field, message", [
    ({"model": BASE, "prompt": "w9", "max_tokens": True}, "max_tokens", "valid integer"),  # lax: read as 1
    ({"model": BASE, "prompt": "w9", "max_tokens": 2.0}, "max_tokens", "valid integer"),
    ({"model": BASE, "prompt": "w9", "stream": "yes"}, "stream", "valid boolean"),  # lax: read as True
    ({"model": BASE, "prompt": "w9", "stream": 1}, "stream", "valid boolean"),
    ({"model": BASE, "prompt": "w9", "temperature": "NaN"}, "temperature", "finite number"),  # was: "<= 2"
    ({"model": BASE, "prompt": "w9", "top_p": "Infinity"}, "top_p", "finite number"),
    ({"model": BASE, "prompt": "w9", "temperature": True}, "temperature", "must be a number, not true"),
    ({"model": BASE, "prompt": "w9", "seed": False}, "seed", "valid integer"),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": True},
     "max_completion_tokens", "valid integer"),
])
def test_mistyped_fields_are_400_naming_the_field(client, body, field, message):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    error = assert_openai_400(client.post(path, json=body))
    assert error["param"] == field and error["message"].startswith(f"invalid request body: {field}: "), error
    assert message in error["message"], error


def test_a_bare_nan_temperature_is_400_too(client):
    # Python's JSON reader takes the bare token NaN, which some clients write
    r = client.post("/v1/completions", content='{"model": "%s", "prompt": "w9", "temperature": NaN}' % BASE,
                    headers={"content-type": "application/json"})
    assert "temperature: Input should be a finite number" in assert_openai_400(r)["message"]


@pytest.mark.parametrize("body, reason", [
    ('{"model": "%s", "prompt": "w9",}' % BASE, "at character 38 (Expecting property name enclosed in double quotes)"),
    ('{"model": "%s"} x' % BASE, "at character 23 (Extra data)"),
])
def test_a_body_that_is_not_json_is_named_as_such(client, body, reason):
    # Was "invalid request body: 38: JSON decode error" with param "38": the offset read as a field name.
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    error = assert_openai_400(r)
    assert error["message"] == f"invalid request body: body: not valid JSON {reason}" and error["param"] == "body"


def test_a_body_that_is_not_utf8_is_named_as_such(client):
    # Was a 400 with code "http_error", param null and Starlette's "There was an error parsing the body".
    body = ('{"model": "%s", "prompt": "caf\xe9"}' % BASE).encode("latin-1")
    error = assert_openai_400(client.post("/v1/completions", content=body, headers={"content-type": "application/json"}))
    assert error["param"] == "body" and error["code"] == "invalid_request", error
    assert error["message"] == ("invalid request body: body: not valid JSON text: "
                                f"byte {body.index(0xe9)} is not valid utf-8 (invalid continuation byte)"), error
