"""A diff loads only when it proves its base and every field has the type the writer gives it; verify
fails exactly the diffs loading refuses (one code path: diffio.READ_STEPS)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from conftest import make_tiny_llama
from sparseft import SparseConfig, SparseModel, get_sparse_model
from sparseft.audit import verify_diff
from sparseft.audit.verify import failed
from sparseft.diffio import CONFIG_NAME, DELTA_NAME, read_diff
from sparseft.errors import DiffCorruptError, DtypeMismatchError, SparseFTError, UnverifiedBaseError


@pytest.fixture
def diff_path(tmp_path):
    model = get_sparse_model(make_tiny_llama(), SparseConfig(density=0.05))
    with torch.no_grad():
        for values in model.sparse_parameters():
            values.normal_(0, 1e-2)
    return model.save_pretrained(tmp_path / "diff")


def edit_config(path, fn):
    meta = json.loads((path / CONFIG_NAME).read_text())
    fn(meta)
    (path / CONFIG_NAME).write_text(json.dumps(meta))


def refused(path, error=SparseFTError, **load_options):
    """Loading raises ``error`` and leaves the base bitwise unchanged; verify fails too."""
    base = make_tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(error) as info:
        SparseModel.from_pretrained(base, path, **load_options)
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in base.parameters())
    assert failed(verify_diff(path, make_tiny_llama()))
    return info.value


# ---------------------------------------------------------------- 1. a diff must prove its base


@pytest.mark.parametrize("edit", [lambda m: m.pop("base_fingerprint"), lambda m: m.update(base_fingerprint={})],
                         ids=["removed", "empty"])
def test_a_diff_without_fingerprint_is_refused_unless_allowed(diff_path, edit, caplog):
    edit_config(diff_path, edit)
    error = refused(diff_path, UnverifiedBaseError)
    assert "allow_unverified_base" in str(error) and str(diff_path) in str(error)
    with caplog.at_level(logging.WARNING, logger="sparseft.base_match"):
        SparseModel.from_pretrained(make_tiny_llama(), diff_path, allow_unverified_base=True)
    assert "no base fingerprint" in caplog.text


@pytest.mark.parametrize("hashes", [{}, {DELTA_NAME: ""}, {DELTA_NAME: None}, {"other": "0" * 64}])
def test_file_hashes_that_skip_the_tensor_file_are_refused(diff_path, hashes):
    edit_config(diff_path, lambda m: m.update(file_hashes=hashes))
    error = refused(diff_path, DiffCorruptError)
    assert "file_hashes" in str(error)


# ---------------------------------------------------------------- 2. wrong types are sparseft errors


@pytest.mark.parametrize("fingerprint", [{"float32": 123}, None, ["a"], "a", {"float32": "not hex"}])
def test_a_mistyped_fingerprint_is_named(diff_path, fingerprint):
    edit_config(diff_path, lambda m: m.update(base_fingerprint=fingerprint))
    assert "base_fingerprint" in str(refused(diff_path, DiffCorruptError))


@pytest.mark.parametrize("field,value,error", [
    ("target_modules", 5, DiffCorruptError),
    ("target_modules", {"q_proj": 1}, DiffCorruptError),
    ("target_modules", [""], DiffCorruptError),
    ("target_modules", ["q_proj"], DiffCorruptError),  # the diff also holds k_proj, v_proj, ...
    ("scorer", "rajdom", DiffCorruptError),
    ("scorer", ["random"], DiffCorruptError),
    ("scorer_weights", [1], DiffCorruptError),
    ("value_dtype", "float16", DiffCorruptError),  # the values are bfloat16: inspect and compose would take float16
])
def test_a_bad_selection_fails_load_and_verify_alike(diff_path, field, value, error):
    edit_config(diff_path, lambda m: m["selection"].__setitem__(field, value))
    assert "selection" in str(refused(diff_path, error))
    statuses = {r.name: r.status for r in verify_diff(diff_path, make_tiny_llama())}
    assert statuses["selection"] == "fail"


def test_a_bit_flip_in_a_module_name_fails_load_and_verify_alike(diff_path):
    def flip(meta):
        name = next(n for n in meta["tensors"] if n.endswith("gate_proj"))
        meta["tensors"][name.replace("gate_proj", "gave_proj")] = meta["tensors"].pop(name)

    edit_config(diff_path, flip)
    assert "gave_proj" in str(refused(diff_path, DiffCorruptError))


@pytest.mark.parametrize("value", [["bfloat16"], {"a": 1}, 16, None])
def test_a_mistyped_value_dtype_is_named(diff_path, value):
    edit_config(diff_path, lambda m: m.update(value_dtype=value))
    assert "value_dtype" in str(refused(diff_path, DtypeMismatchError))


@pytest.mark.parametrize("field,value", [("base_model", 7), ("provenance", []), ("selection", "x"), ("format_version", True)])
def test_other_mistyped_fields_are_sparseft_errors(diff_path, field, value):
    edit_config(diff_path, lambda m: m.update({field: value}))
    refused(diff_path)


def test_json_nested_too_deep_is_a_corrupt_diff(diff_path):
    (diff_path / CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in str(refused(diff_path, DiffCorruptError))


# ---------------------------------------------------------------- 6. files outside the diff directory


@pytest.mark.parametrize("name", [CONFIG_NAME, DELTA_NAME])
def test_a_symlink_out_of_the_diff_directory_is_refused_by_load_and_verify(diff_path, tmp_path, name):
    outside = tmp_path / f"elsewhere-{name}"
    shutil.move(diff_path / name, outside)
    (diff_path / name).symlink_to(outside)
    error = refused(diff_path, DiffCorruptError)
    assert "outside the diff directory" in str(error)
    reasons = " ".join(r.reason for r in verify_diff(diff_path, make_tiny_llama()))
    assert "outside the diff directory" in reasons


def test_a_symlink_inside_the_diff_directory_is_fine(diff_path):
    shutil.move(diff_path / DELTA_NAME, diff_path / "values.bin")
    (diff_path / DELTA_NAME).symlink_to("values.bin")
    read_diff(diff_path)
    assert not failed(verify_diff(diff_path, make_tiny_llama()))
