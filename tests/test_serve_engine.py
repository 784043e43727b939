"""The switching engine and the registry without HTTP: exact restore, grouping, validation while merged."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from conftest import make_tiny_llama
from serve_fixtures import make_diff, make_tokenizer
from sparseft import SparseModel
from sparseft.base_match import fingerprint
from sparseft.errors import DiffRegistryError, FingerprintMismatchError, ServerBusyError, UnknownDiffError
from sparseft.serve import DiffRegistry, Engine, SamplingParams
from sparseft.serve.decoding import TextStream
from sparseft.serve.engine import Job, order_by_diff
from sparseft.serve.registry import DiffVersion


@pytest.fixture(scope="module")
def diffs(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    return {"a": make_diff(root / "a", seed=1), "b": make_diff(root / "b", seed=2),
            "foreign": make_diff(root / "foreign", seed=3, base_seed=7)}


def snapshot(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def assert_bitwise(model, state):
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def engine_and_registry(dtype=torch.float32, **kw):
    engine = Engine(make_tiny_llama().to(dtype), make_tokenizer(), **kw)
    return engine, DiffRegistry(engine.validated_entries, reserved_names=("base",))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_switching_is_exact_and_matches_sparse_model_merge(diffs, dtype):
    engine, registry = engine_and_registry(dtype)
    base = snapshot(engine.model)
    a, b = registry.load("a", diffs["a"]), registry.load("b", diffs["b"])
    with engine.weights_lock:
        engine.switch_to(a)
        merged_a = SparseModel.from_pretrained(make_tiny_llama().to(dtype), diffs["a"]).merge_and_unload()
        assert_bitwise(engine.model, merged_a.state_dict())
        engine.switch_to(b)
        engine.switch_to(a)
        engine.switch_to(None)
    assert_bitwise(engine.model, base)
    assert engine.swaps == 4


@pytest.mark.parametrize("value_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_merge_and_server_switch_write_bitwise_identical_weights(tmp_path, dtype, value_dtype):
    # The model path rounds fp32 values it loaded; the server rounds the stored ones: both must give the same bits.
    diff_dir = make_diff(tmp_path / "d", seed=4, value_dtype=value_dtype)
    model = SparseModel.from_pretrained(make_tiny_llama().to(dtype), diff_dir)
    model.merge()
    by_model = {n.replace(".base_layer", ""): t for n, t in model.base_model.state_dict().items() if not n.endswith(".values")}
    engine, registry = engine_and_registry(dtype)
    base = snapshot(engine.model)
    loaded = registry.load("d", diff_dir)  # validation takes weights_lock itself
    with engine.weights_lock:
        engine.switch_to(loaded)
    by_server = engine.model.state_dict()
    assert by_model.keys() == by_server.keys()
    for name, weight in by_server.items():
        assert torch.equal(weight, by_model[name]), name
    assert sum(not torch.equal(by_server[n], base[n]) for n in base) == len(model.sparse_layers())


def test_a_failing_merge_leaves_no_half_merged_diff(diffs):
    engine, registry = engine_and_registry()
    base = snapshot(engine.model)
    good = registry.load("a", diffs["a"])
    names = sorted(good.entries)
    entries = dict(good.entries)
    indices, values = entries[names[-1]]
    entries[names[-1]] = (indices + 10**9, values)  # the last module fails after the others were merged
    broken = DiffVersion("broken", 1, "memory", "", 0, 0.0, entries)
    with engine.weights_lock, pytest.raises((IndexError, RuntimeError)):
        engine.switch_to(broken)
    assert engine.merged is None
    assert_bitwise(engine.model, base)


def test_validation_hashes_the_base_while_a_diff_is_merged(diffs):
    engine, registry = engine_and_registry()
    a = registry.load("a", diffs["a"])
    with engine.weights_lock:
        engine.switch_to(a)
    # The live weights now hold W + S, yet a new diff for this base loads and a foreign one is refused.
    assert registry.load("b", diffs["b"]).version == 1
    with pytest.raises(FingerprintMismatchError):
        registry.load("foreign", diffs["foreign"])
    engine._fingerprints.clear()  # computed again from the merged weights' base view
    targets = {n: engine.model.get_submodule(n).weight for n in a.entries}
    with engine.weights_lock:
        engine.switch_to(None)
        expected = fingerprint(targets)
        engine.switch_to(a)
    assert engine.base_fingerprint(targets) == expected


def test_a_round_is_grouped_by_diff_merged_one_first():
    a, b = object(), object()
    jobs = [Job(d, [1], SamplingParams(1), print) for d in (a, b, None, a, b, a)]
    ordered = order_by_diff(jobs, merged=b)
    assert [j.diff for j in ordered] == [b, b, a, a, a, None]
    assert [id(j) for j in ordered if j.diff is a] == [id(jobs[0]), id(jobs[3]), id(jobs[5])]


def test_mixed_queue_costs_one_swap_per_diff_and_each_job_gets_its_diff(diffs):
    engine, registry = engine_and_registry()
    a, b = registry.load("a", diffs["a"]), registry.load("b", diffs["b"])
    prompt, params = [1, 10, 20, 30], SamplingParams(max_tokens=6)
    results, done = {}, threading.Semaphore(0)

    def sink(i):
        def on_event(kind, payload):
            if kind in ("done", "error"):
                results[i] = payload
                done.release()
        return on_event

    order = [a, b, a, b, a, b]
    for i, diff in enumerate(order):  # queued before the worker starts: one round
        engine.submit(diff, prompt, params, sink(i))
    engine.start()
    for _ in order:
        done.acquire(timeout=60)
    engine.stop()
    assert engine.swaps == 2
    expected = {}
    for diff, path in ((a, diffs["a"]), (b, diffs["b"])):
        model = SparseModel.from_pretrained(make_tiny_llama(), path)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
        expected[diff.name] = out[0, len(prompt):].tolist()
    for i, diff in enumerate(order):
        assert results[i].token_ids == expected[diff.name]
    assert engine.merged is None  # stop() restores the base


def test_full_queue_is_refused():
    engine, _ = engine_and_registry(max_queue=2)
    for _ in range(2):
        engine.submit(None, [1], SamplingParams(1), lambda kind, payload: None)
    with pytest.raises(ServerBusyError, match="limit 2"):
        engine.submit(None, [1], SamplingParams(1), lambda kind, payload: None)


def test_registry_versions_and_names(diffs):
    _, registry = engine_and_registry()
    registry.load("a", diffs["a"])
    registry.load("a", diffs["b"])
    assert registry.resolve("a").version == 2 and registry.resolve("a@1").version == 1
    assert registry.rollback("a").version == 1 and registry.resolve("a").version == 1
    assert registry.ensure("a", diffs["b"]).version == 2  # known content: reused, current kept
    assert registry.resolve("a").version == 1
    with pytest.raises(UnknownDiffError):
        registry.resolve("a@3")
    for malformed in ("a@x", "a@²", "a@"):  # a malformed version is the client's error, not an unknown model
        with pytest.raises(DiffRegistryError, match="version number"):
            registry.resolve(malformed)
    with pytest.raises(DiffRegistryError, match="base model's name"):
        registry.load("base", diffs["a"])
    with pytest.raises(DiffRegistryError, match="invalid"):
        registry.load("../up", diffs["a"])


def test_corrupt_registry_file_is_a_clear_error(tmp_path, diffs):
    engine, _ = engine_and_registry()
    (tmp_path / "registry.json").write_text('{"format": "something else"}')
    with pytest.raises(DiffRegistryError, match="registry.json.*not a sparseft serving registry"):
        DiffRegistry(engine.validated_entries, directory=tmp_path)
    registry = DiffRegistry(engine.validated_entries, directory=tmp_path / "ok")
    registry.load("a", diffs["a"])
    stored = tmp_path / "ok" / "diffs" / "a" / "v1" / "sparse_config.json"
    stored.write_text(stored.read_text().replace('"base_model"', '"base_model" ', 1))  # same JSON, other bytes
    with pytest.raises(DiffRegistryError, match="modified since they were registered"):
        DiffRegistry(engine.validated_entries, directory=tmp_path / "ok")


def set_version(value):
    return lambda entry: entry["versions"][0].__setitem__("version", value)


def duplicate_version(entry):
    entry["versions"].append(dict(entry["versions"][0]))


@pytest.mark.parametrize("change, message", [
    (lambda entry: entry["versions"].__setitem__(0, "v1"), r"\.versions\[0\] must be an object, got 'v1'"),
    (set_version("1"), r"\.versions\[0\]\.version must be a whole number >= 1, got '1'"),
    (set_version(1.5), r"\.versions\[0\]\.version must be a whole number >= 1, got 1\.5"),
    (duplicate_version, r" lists a version twice \(versions: \[1, 1\]\)"),
    # Was served from wherever it pointed (and an unload would have deleted that folder).
    (lambda entry: entry["versions"][0].__setitem__("path", "../elsewhere"),
     r"\.versions\[0\]\.path must be 'diffs/a/v1' \(where the copy is stored\), got '\.\./elsewhere'"),
    (lambda entry: entry["versions"][0].__setitem__("source", 5), r"\.versions\[0\]\.source must be a string, got 5"),
])
def test_a_hand_edited_registry_version_is_named(tmp_path, diffs, change, message):
    # Was an AttributeError (a record that is not an object), or a version int() read as 1 ("1", 1.5), twice.
    engine, _ = engine_and_registry()
    DiffRegistry(engine.validated_entries, directory=tmp_path).load("a", diffs["a"])
    state = json.loads((tmp_path / "registry.json").read_text())
    change(state["diffs"]["a"])
    (tmp_path / "registry.json").write_text(json.dumps(state))
    with pytest.raises(DiffRegistryError, match=r"registry\.json: diffs\.a" + message):
        DiffRegistry(engine.validated_entries, directory=tmp_path)


def test_a_stored_diff_named_as_the_base_is_refused_at_restart(tmp_path, diffs):
    # Restarted with the base served under a stored diff's name, every request for "a" silently got the base.
    engine, _ = engine_and_registry()
    DiffRegistry(engine.validated_entries, directory=tmp_path).load("a", diffs["a"])
    with pytest.raises(DiffRegistryError, match=r"registry\.json: diff name 'a' is the base model's name"):
        DiffRegistry(engine.validated_entries, reserved_names=("a",), directory=tmp_path)


def registry_files(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_unload_that_cannot_write_the_registry_changes_nothing(tmp_path, diffs, monkeypatch):
    engine, _ = engine_and_registry()
    registry = DiffRegistry(engine.validated_entries, directory=tmp_path)
    registry.load("a", diffs["a"])
    registry.load("a", diffs["b"])
    registry.rollback("a")
    registry.load("b", diffs["b"])
    listing, files = registry.listing(), registry_files(tmp_path)

    def save_fails():
        raise OSError("No space left on device")

    monkeypatch.setattr(registry, "_save", save_fails)
    with pytest.raises(OSError, match="No space left"):
        registry.unload("a")
    assert registry.listing() == listing and registry.resolve("a").version == 1
    assert registry.count_versions() == 3 and registry.resolve("a@2").version == 2
    assert registry_files(tmp_path) == files  # registry.json and both stored copies untouched

    monkeypatch.undo()
    assert [v.version for v in registry.unload("a")] == [1, 2]
    assert registry.names() == ["b"] and sorted(p.name for p in (tmp_path / "diffs").iterdir()) == ["b"]
    assert DiffRegistry(engine.validated_entries, directory=tmp_path).listing() == registry.listing()
    assert registry.load("a", diffs["a"]).version == 1  # the name is free again, stored afresh
    assert DiffRegistry(engine.validated_entries, directory=tmp_path).names() == ["a", "b"]


def test_copies_an_unload_could_not_delete_are_removed_at_the_next_start(tmp_path, diffs, monkeypatch):
    engine, _ = engine_and_registry()
    registry = DiffRegistry(engine.validated_entries, directory=tmp_path)
    registry.load("a", diffs["a"])
    registry.load("b", diffs["b"])
    monkeypatch.setattr("sparseft.serve.registry.shutil.rmtree", lambda *a, **k: None)  # the delete fails
    registry.unload("a")
    monkeypatch.undo()
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "diffs").iterdir()) == [".unloaded", "b"]
    restarted = DiffRegistry(engine.validated_entries, directory=tmp_path)
    assert restarted.names() == ["b"] and [p.name for p in (tmp_path / "diffs").iterdir()] == ["b"]


def test_text_stream_never_emits_part_of_a_stop_string():
    tok = make_tokenizer()
    ids = tok("w10 w11 w12 w13")["input_ids"]
    stream = TextStream(tok, stop=["w12 w13"])
    pieces = [stream.update(ids[: n + 1]) for n in range(len(ids))]
    assert "".join(pieces) == "w10 w11 " and stream.stopped
    assert stream.finish(ids) == ""
