import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_llama
from sparseft import SparseConfig, SparseModel, get_sparse_model
from sparseft.audit import inspect_diff
from sparseft.diffio import (
    CONFIG_NAME,
    DELTA_NAME,
    decode_indices,
    encode_indices,
    file_sha256,
    read_diff,
    write_diff,
)
from sparseft.errors import (
    DiffCorruptError,
    DiffNotFoundError,
    DtypeMismatchError,
    InvalidIndicesError,
    NonFiniteValuesError,
    ShapeMismatchError,
    SparseFTError,
    UnsupportedFormatError,
)


def test_index_coding_round_trips_with_escapes():
    idx = torch.tensor([0, 1, 5, 65535, 65536 + 65535, 10**9, 10**9 + 70000, 10**9 + 70001])
    gaps, escapes = encode_indices(idx)
    assert gaps.dtype == torch.int16 and escapes.numel() == 3
    assert torch.equal(decode_indices(gaps, escapes), idx)


def saved_diff(tmp_path, **cfg):
    model = get_sparse_model(make_tiny_llama(), SparseConfig(density=0.05, **cfg))
    with torch.no_grad():
        for layer in model.sparse_layers().values():
            layer.values.normal_(0, 1e-2)
    path = model.save_pretrained(tmp_path / "diff")
    return path, model.to_diff()


def rewrite_delta(path, **changes):
    """Edit the safetensors file and re-record its hash, as a buggy or hostile writer would."""
    tensors = load_file(str(path / DELTA_NAME))
    tensors.update(changes)
    save_file(tensors, str(path / DELTA_NAME))
    meta = json.loads((path / CONFIG_NAME).read_text())
    meta["file_hashes"][DELTA_NAME] = file_sha256(path / DELTA_NAME)
    (path / CONFIG_NAME).write_text(json.dumps(meta))


def edit_config(path, fn):
    meta = json.loads((path / CONFIG_NAME).read_text())
    fn(meta)
    (path / CONFIG_NAME).write_text(json.dumps(meta))


def truncate(path):
    data = (path / DELTA_NAME).read_bytes()
    (path / DELTA_NAME).write_bytes(data[: len(data) // 2])


def corrupt_cases():
    def nan_values(p):
        v = load_file(str(p / DELTA_NAME))["values"].clone()
        v[3] = float("nan")
        rewrite_delta(p, values=v)

    def inf_values(p):
        v = load_file(str(p / DELTA_NAME))["values"].clone()
        v[0] = float("inf")
        rewrite_delta(p, values=v)

    def fp16_values(p):
        rewrite_delta(p, values=load_file(str(p / DELTA_NAME))["values"].to(torch.float16))

    def duplicate_index(p):
        g = load_file(str(p / DELTA_NAME))["gaps"].clone()
        g[5] = 0  # an escape ...
        e = torch.cat([load_file(str(p / DELTA_NAME))["escapes"], torch.tensor([0])])  # ... of gap 0: a repeat
        rewrite_delta(p, gaps=g, escapes=e)

    def unsorted_index(p):
        g = load_file(str(p / DELTA_NAME))["gaps"].clone()
        g[5] = 0
        rewrite_delta(p, gaps=g, escapes=torch.tensor([-3]))

    def out_of_range(p):
        g = load_file(str(p / DELTA_NAME))["gaps"].clone()
        g[-1] = 0
        rewrite_delta(p, gaps=g, escapes=torch.tensor([10**7]))

    def shape_mismatch(p):
        edit_config(p, lambda m: m["tensors"]["model.layers.0.self_attn.q_proj"].__setitem__("shape", [64, 32]))

    def unknown_module(p):
        def rename(m):
            m["tensors"]["model.layers.1.self_attn.zz_proj"] = m["tensors"].pop("model.layers.1.self_attn.v_proj")
        edit_config(p, rename)

    def absent_module(p):  # matched by target_modules, but the model has no layer 9
        def rename(m):
            m["tensors"]["model.layers.9.self_attn.v_proj"] = m["tensors"].pop("model.layers.1.self_attn.v_proj")
        edit_config(p, rename)

    def column(name):  # a [n, 1] stream has the right numel, so only a 1-D check catches it
        return lambda p: rewrite_delta(p, **{name: load_file(str(p / DELTA_NAME))[name].reshape(-1, 1)})

    def no_modules(p):  # consistent with itself, but there is nothing to fingerprint or apply
        edit_config(p, lambda m: m.__setitem__("tensors", {}))
        rewrite_delta(p, gaps=torch.zeros(0, dtype=torch.int16), escapes=torch.zeros(0, dtype=torch.long),
                      values=torch.zeros(0, dtype=torch.bfloat16))

    def extra_tensor(p):  # per-module values added by hand: loading would silently ignore them
        rewrite_delta(p, **{"model.layers.0.self_attn.q_proj": torch.zeros(4, dtype=torch.bfloat16)})

    return [
        ("no modules", no_modules, DiffCorruptError),
        ("extra tensor", extra_tensor, DiffCorruptError),
        ("values not 1-D", column("values"), DiffCorruptError),
        ("gaps not 1-D", column("gaps"), DiffCorruptError),
        ("escapes not 1-D", column("escapes"), DiffCorruptError),
        ("missing config", lambda p: (p / CONFIG_NAME).unlink(), DiffNotFoundError),
        ("missing delta", lambda p: (p / DELTA_NAME).unlink(), DiffNotFoundError),
        ("truncated delta", truncate, DiffCorruptError),
        ("config not json", lambda p: (p / CONFIG_NAME).write_text("{oops"), DiffCorruptError),
        ("unknown version", lambda p: edit_config(p, lambda m: m.__setitem__("format_version", 99)), UnsupportedFormatError),
        ("edited without hash", lambda p: (p / DELTA_NAME).write_bytes((p / DELTA_NAME).read_bytes()[:-1] + b"\x01"), DiffCorruptError),
        ("nan values", nan_values, NonFiniteValuesError),
        ("inf values", inf_values, NonFiniteValuesError),
        ("wrong dtype", fp16_values, DtypeMismatchError),
        ("duplicated index", duplicate_index, InvalidIndicesError),
        ("unsorted index", unsorted_index, InvalidIndicesError),
        ("index out of range", out_of_range, InvalidIndicesError),
        ("shape mismatch", shape_mismatch, ShapeMismatchError),
        ("module outside target_modules", unknown_module, DiffCorruptError),
        ("absent module", absent_module, ShapeMismatchError),
    ]


@pytest.mark.parametrize("case", corrupt_cases(), ids=lambda c: c[0])
def test_bad_diff_raises_its_error_and_leaves_model_unchanged(case, tmp_path):
    _, corrupt, error = case
    path, _ = saved_diff(tmp_path)
    corrupt(path)
    base = make_tiny_llama()
    before = {n: t.clone() for n, t in base.state_dict().items()}
    modules_before = [type(m) for m in base.modules()]
    with pytest.raises(error) as info:
        SparseModel.from_pretrained(base, path)
    assert isinstance(info.value, SparseFTError)
    assert str(path.name) in str(info.value) or "diff" in str(info.value)
    assert_unchanged(base, before, modules_before)


def assert_unchanged(base, before, modules_before):
    assert [type(m) for m in base.modules()] == modules_before
    assert all(p.requires_grad for p in base.parameters())  # not frozen either
    after = base.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


def test_values_not_1d_are_named(tmp_path):
    path, diff = saved_diff(tmp_path)
    rewrite_delta(path, values=load_file(str(path / DELTA_NAME))["values"].reshape(-1, 1))
    with pytest.raises(DiffCorruptError, match=r"tensor 'values' must be 1-D, got shape \(\d+, 1\)"):
        read_diff(path)
    name = sorted(diff.values)[0]
    diff.values[name] = diff.values[name].reshape(-1, 1)  # an in-memory diff is checked the same way
    with pytest.raises(DiffCorruptError, match=f"values of {name} must be 1-D"):
        write_diff(diff, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_a_failure_while_wrapping_undoes_the_wrapping(tmp_path, monkeypatch):
    """from_pretrained promises an unchanged model on any error, even one after validation."""
    import sparseft.model as model_module

    path, _ = saved_diff(tmp_path)
    base = make_tiny_llama()
    before = {n: t.clone() for n, t in base.state_dict().items()}
    modules_before = [type(m) for m in base.modules()]
    real, made = model_module.SparseLinear, []

    def flaky(*args, **kwargs):
        if len(made) == 3:
            raise RuntimeError("out of memory")
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(model_module, "SparseLinear", flaky)
    with pytest.raises(RuntimeError, match="out of memory"):
        SparseModel.from_pretrained(base, path)
    assert len(made) == 3  # three layers had been wrapped
    assert_unchanged(base, before, modules_before)


def test_missing_directory(tmp_path):
    with pytest.raises(DiffNotFoundError, match="no such diff directory"):
        read_diff(tmp_path / "absent")


def test_crash_during_save_keeps_previous_diff(tmp_path, monkeypatch):
    path, diff = saved_diff(tmp_path)
    before = {f.name: f.read_bytes() for f in path.iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr("sparseft.diffio.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        write_diff(diff, path)
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["diff"]  # no temporary left behind


def test_same_diff_same_bytes(tmp_path):
    _, diff = saved_diff(tmp_path)
    write_diff(diff, tmp_path / "a")
    write_diff(diff, tmp_path / "b")
    for name in (CONFIG_NAME, DELTA_NAME):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_bytes_per_entry_target_at_density_one_percent(tmp_path):
    base = make_tiny_llama(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    model = get_sparse_model(base, SparseConfig(density=0.01, value_dtype="bfloat16"))
    path = model.save_pretrained(tmp_path / "diff")
    report = inspect_diff(path)
    assert report["num_entries"] == model.num_trainable()
    assert report["bytes_per_entry"] <= 4.5, report["bytes_per_entry"]
    assert abs(report["density"] - 0.01) < 1e-4
