"""Property-based fuzzing (hypothesis) of the two ways untrusted bytes reach sparseft: diff files and HTTP bodies.

Diffs: byte flips, truncations, JSON type/value mutations of ``sparse_config.json`` and element edits of
``sparse_delta.safetensors`` (with the hash re-recorded, as a careful attacker would). For each: loading
raises a ``sparseft.errors`` class and leaves the base bitwise unchanged, or yields finite values over
the base whose fingerprint the diff records; and ``verify`` fails whenever loading fails.

Requests: malformed OpenAI bodies against the in-process app: every answer is a 2xx or a 4xx with an
OpenAI-style JSON error counted in ``sparseft_request_errors_total``; never a 500.

The seed is fixed (``derandomize=True``). By default each of the 5 diff mutation kinds gets 80 cases and
the request property 200 (600 in all, well under a minute); ``SPARSEFT_FUZZ_EXAMPLES=N`` runs N per kind
and N requests instead (see docs/audit.md).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import make_tiny_llama
from serve_fixtures import make_tokenizer
from sparseft import SparseConfig, SparseModel, get_sparse_model
from sparseft.audit import verify_diff
from sparseft.audit.verify import failed
from sparseft.base_match import fingerprint
from sparseft.diffio import CONFIG_NAME, DELTA_NAME, file_sha256
from sparseft.errors import SparseFTError
from sparseft.serve import DiffRegistry, Engine, ServeLimits, create_app

EXAMPLES = int(os.environ.get("SPARSEFT_FUZZ_EXAMPLES", "0")) or None
DIFF_EXAMPLES_PER_MUTATION = 80
SERVE_EXAMPLES = 200
FUZZ = settings(
    max_examples=EXAMPLES or DIFF_EXAMPLES_PER_MUTATION,
    derandomize=True,  # the same cases on every run: a failure in CI reproduces locally
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SERVE_FUZZ = settings(FUZZ, max_examples=EXAMPLES or SERVE_EXAMPLES)

BASE = "tiny-base"

# ---------------------------------------------------------------- values a mutation writes

# Near misses of what the writer puts there, then anything JSON holds.
NEAR_MISSES = st.sampled_from([
    None, True, 0, -1, 1, 7, 2**31, 2**63, -(2**63), 10**30, 0.5, 1e308, -0.0, "", "x", "q_proj", "gave_proj",
    "bfloat16", "float16", "float32", "random", "rajdom", "0" * 64, "\u00b2", [], {}, [""], ["q_proj"], [5],
    {"q_proj": 1}, {"float32": 123}, {"float32": "0" * 64}, [[]], {"shape": [32, 32], "k": 1},
])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
VALUES = st.one_of(NEAR_MISSES, JSON_VALUES)


def json_paths(node, path=()):
    """Every path into a JSON tree, containers included."""
    yield path
    if isinstance(node, dict):
        for key, child in node.items():
            yield from json_paths(child, path + (key,))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from json_paths(child, path + (i,))


def mutate_json(data, meta):
    """Replace, delete or add one value somewhere in ``meta`` (in place; returns the new root)."""
    path = data.draw(st.sampled_from(list(json_paths(meta))))
    if not path:
        return data.draw(VALUES)
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif action == "add" and isinstance(parent, dict):
        parent[data.draw(st.text(max_size=12))] = data.draw(VALUES)
    else:
        parent[path[-1]] = data.draw(VALUES)
    return meta


def flip_bytes(data, raw: bytes) -> bytes:
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        # The start of the file (safetensors header, JSON keys) matters most: draw there half the time.
        hi = min(len(out), 256) if data.draw(st.booleans()) else len(out)
        pos = data.draw(st.integers(0, hi - 1))
        out[pos] ^= data.draw(st.integers(1, 255))
    return bytes(out)


def edit_tensor(data, path: Path) -> None:
    """Change one element (or the length) of one stream of the tensor file."""
    tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    name = data.draw(st.sampled_from(sorted(tensors)))
    t = tensors[name]
    if t.numel() == 0 or data.draw(st.integers(0, 4)) == 0:
        cut = data.draw(st.integers(0, max(t.numel() + 2, 1)))
        tensors[name] = torch.cat([t, t[:1].repeat(cut)]) if cut > t.numel() else t[:cut].clone()
    else:
        pos = data.draw(st.integers(0, t.numel() - 1))
        if t.dtype.is_floating_point:
            t[pos] = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, 1e30, -2.0]))
        else:
            info = torch.iinfo(t.dtype)
            t[pos] = data.draw(st.integers(info.min, info.max))
    save_file(tensors, str(path), metadata={"format": "sparseft-diff"})


def rehash(path: Path) -> None:
    """Record the tensor file's current sha256, so the later checks (not the hash check) must catch the edit."""
    try:
        meta = json.loads((path / CONFIG_NAME).read_text())
        meta["file_hashes"][DELTA_NAME] = file_sha256(path / DELTA_NAME)
    except (ValueError, TypeError, KeyError, RecursionError):
        return  # the config is already broken in a way that makes it unreadable
    (path / CONFIG_NAME).write_text(json.dumps(meta))


# ---------------------------------------------------------------- the diff property


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A valid diff's two files (bytes) and the base it was made for."""
    base = make_tiny_llama()
    sparse = get_sparse_model(base, SparseConfig(density=0.03, target_modules=["q_proj", "v_proj", "gate_proj"]))
    with torch.no_grad():
        for values in sparse.sparse_parameters():
            values.normal_(0, 1e-2)
    path = sparse.save_pretrained(tmp_path_factory.mktemp("fuzz") / "diff")
    sparse.unload()
    return {name: (path / name).read_bytes() for name in (CONFIG_NAME, DELTA_NAME)}


@pytest.fixture(scope="module")
def base():
    model = make_tiny_llama()
    return model, {k: v.clone() for k, v in model.state_dict().items()}


MUTATIONS = ["config json", "config bytes", "delta bytes", "delta tensor", "truncate"]


def write_mutant(data, files: dict[str, bytes], path: Path, kind: str) -> None:
    path.mkdir()
    for name, raw in files.items():
        (path / name).write_bytes(raw)
    if kind == "config json":
        meta = mutate_json(data, json.loads(files[CONFIG_NAME]))
        (path / CONFIG_NAME).write_text(json.dumps(meta))
    elif kind == "truncate":
        name = data.draw(st.sampled_from(sorted(files)))
        (path / name).write_bytes(files[name][: data.draw(st.integers(0, len(files[name]) - 1))])
    else:
        name = CONFIG_NAME if kind == "config bytes" else DELTA_NAME
        if kind == "delta tensor":
            edit_tensor(data, path / DELTA_NAME)
        else:
            (path / name).write_bytes(flip_bytes(data, files[name]))
        if name == DELTA_NAME and data.draw(st.booleans()):
            rehash(path)


def assert_is(model, state) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), f"{k} changed"
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", MUTATIONS)  # each kind gets its share of the budget
@FUZZ
@given(data=st.data())
def test_a_mutated_diff_loads_correctly_or_raises_a_sparseft_error(original, base, kind, data):
    model, state = base
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "diff"
        write_mutant(data, original, path, kind)
        try:
            sparse = SparseModel.from_pretrained(model, path)
        except SparseFTError as e:
            event(f"refused: {type(e).__name__}")  # shown by --hypothesis-show-statistics
            loaded = False
            assert_is(model, state)  # a refused diff changes nothing
        else:
            event("loaded")
            loaded = True
            layers = sparse.sparse_layers()
            assert all(bool(torch.isfinite(layer.values).all()) for layer in layers.values())
            recorded = json.loads((path / CONFIG_NAME).read_text())["base_fingerprint"]["float32"]
            assert fingerprint({n: layer.weight for n, layer in layers.items()}) == recorded
            sparse.unload()
            for p in model.parameters():  # from_pretrained freezes the base (by design); thaw it for the next case
                p.requires_grad_(True)
            assert_is(model, state)
        results = verify_diff(path, model)
        assert_is(model, state)
        if not loaded:
            assert failed(results), "verify passed a diff that loading refuses"


# ---------------------------------------------------------------- the request property

TEXTS = st.sampled_from(["w9 w10", "", "\ud800 hi", "a@\u00b2", "\x00", BASE, f"{BASE}@1", f"{BASE}@", "nope", "x" * 300])
NUMBERS = st.sampled_from([1e-45, 5e-324, 1e-4, 1e-3, 0, 1, 3, -1, 2.0001, 2**31, 2**64, 2**70, -(2**63) - 1,
                           float("inf"), -float("inf"), float("nan")])
MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "bot", 3]),
                           "content": TEXTS | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXTS}),
                                                       max_size=2) | JSON_VALUES}),
    max_size=2,
)
# Each field is set to a value near what it takes (so the rest of the body stays valid), or to anything.
FIELD_VALUES = {
    "model": TEXTS,
    "prompt": TEXTS | st.lists(st.integers(-5, 2**70), max_size=3),
    "messages": MESSAGES,
    "max_tokens": NUMBERS,
    "max_completion_tokens": NUMBERS,
    "temperature": NUMBERS | st.floats(0, 2),
    "top_p": NUMBERS | st.floats(0, 1),
    "n": NUMBERS,
    "seed": NUMBERS | st.integers(),
    "stream": st.booleans(),
    "stop": TEXTS | st.lists(TEXTS, max_size=2),
    "logprobs": VALUES,
}


def request_body(data, path: str) -> bytes:
    kind = data.draw(st.sampled_from(["fields"] * 5 + ["bytes", "truncated", "not an object"]))
    event(f"body: {kind}")
    if kind == "bytes":
        return data.draw(st.binary(max_size=64))
    if kind == "not an object":
        return json.dumps(data.draw(JSON_VALUES)).encode()
    body = {"model": BASE, "max_tokens": 2, "temperature": 0}
    body.update({"messages": [{"role": "user", "content": "w9"}]} if "chat" in path else {"prompt": "w9 w10"})
    for _ in range(data.draw(st.integers(1, 2))):
        field = data.draw(st.sampled_from(sorted(FIELD_VALUES)))
        action = data.draw(st.sampled_from(["near", "near", "near", "anything", "remove"]))
        if action == "remove":
            body.pop(field, None)
        else:
            body[field] = data.draw(FIELD_VALUES[field] if action == "near" else VALUES)
    raw = json.dumps(body).encode()  # a lone surrogate is written as the escape "\ud800", as clients send it
    return raw[: data.draw(st.integers(0, len(raw) - 1))] if kind == "truncated" else raw


@pytest.fixture(scope="module")
def client():
    engine = Engine(make_tiny_llama(), make_tokenizer())
    app = create_app(engine, DiffRegistry(engine.validated_entries, reserved_names=(BASE,)), BASE,
                     ServeLimits(max_body_bytes=2048, max_tokens=4))
    with TestClient(app) as c:  # an unhandled exception would be raised here
        yield c


def error_count(client, endpoint: str, status: int) -> float:
    text = client.get("/metrics").text
    match = re.search(rf'sparseft_request_errors_total\{{endpoint="{re.escape(endpoint)}",status="{status}"\}} (\S+)', text)
    return float(match.group(1)) if match else 0.0


@pytest.mark.timeout(300)
@SERVE_FUZZ
@given(data=st.data())
def test_a_malformed_request_gets_a_counted_4xx_json_error(client, data):
    path = data.draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    body = request_body(data, path)
    counts = {s: error_count(client, path, s) for s in (400, 404, 413, 422, 500)}
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    event(f"status {r.status_code}")
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        error = r.json()["error"]
        assert error["message"] and error["type"], error
        if r.status_code in counts:
            assert error_count(client, path, r.status_code) == counts[r.status_code] + 1
