"""sparseft verify: each tampering is reported by the check that catches it, one FAIL line each."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_llama
from sparseft import SparseConfig, get_sparse_model
from sparseft.audit import verify_diff
from sparseft.audit.verify import CHECKS
from sparseft.cli import main
from sparseft.diffio import CONFIG_NAME, DELTA_NAME, file_sha256

ALL = set(CHECKS)


@pytest.fixture
def diff_path(tmp_path):
    model = get_sparse_model(make_tiny_llama(), SparseConfig(density=0.05))
    with torch.no_grad():
        for layer in model.sparse_layers().values():
            layer.values.normal_(0, 1e-2)
    return model.save_pretrained(tmp_path / "diff")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("verify") / "base"
    make_tiny_llama().save_pretrained(path)
    return path


def edit_values(path, fn, rehash):
    """Change the stored tensors; ``rehash`` re-records the file hash as a careful attacker would."""
    tensors = {k: v.clone() for k, v in load_file(str(path / DELTA_NAME)).items()}
    fn(tensors)
    save_file(tensors, str(path / DELTA_NAME), metadata={"format": "sparseft-diff"})
    if rehash:
        edit_config(path, lambda m: m["file_hashes"].__setitem__(DELTA_NAME, file_sha256(path / DELTA_NAME)))


def edit_config(path, fn):
    meta = json.loads((path / CONFIG_NAME).read_text())
    fn(meta)
    (path / CONFIG_NAME).write_text(json.dumps(meta))


def add_to_first_value(t):
    t["values"][0] += 0.5


def nan_value(t):
    t["values"][7] = float("nan")


def out_of_range(t):
    t["gaps"][-1] = 0
    t["escapes"] = torch.tensor([10**7])


def truncate(p):
    data = (p / DELTA_NAME).read_bytes()
    (p / DELTA_NAME).write_bytes(data[: len(data) // 2])


CASES = [
    # (name, tamper, failed checks, skipped checks besides the model checks without --model)
    ("edited value", lambda p: edit_values(p, add_to_first_value, rehash=False), {"file_hashes"}, set()),
    ("edited value, rehashed to NaN", lambda p: edit_values(p, nan_value, rehash=True), {"values"}, set()),
    ("truncated file", truncate, {"file_hashes", "tensors"}, {"dtypes", "indices", "values"}),
    ("index out of range, rehashed", lambda p: edit_values(p, out_of_range, rehash=True), {"indices"}, set()),
    ("fp16 values, rehashed", lambda p: edit_values(p, lambda t: t.__setitem__("values", t["values"].half()), True),
     {"dtypes"}, set()),
    ("missing config", lambda p: (p / CONFIG_NAME).unlink(), {"config"}, ALL - {"config"}),
    ("hash entry points outside", lambda p: edit_config(p, lambda m: m["file_hashes"].__setitem__("../x", "0" * 64)),
     {"file_hashes"}, set()),
    ("bad selection", lambda p: edit_config(p, lambda m: m["selection"].__setitem__("scorer_x", 1)), {"selection"}, set()),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_tampering_fails_the_right_check(case, diff_path, capsys):
    _, tamper, expected_fail, expected_skip = case
    tamper(diff_path)
    results = {r.name: r for r in verify_diff(diff_path)}
    assert {n for n, r in results.items() if r.status == "fail"} == expected_fail
    assert {n for n, r in results.items() if r.status == "skip"} == expected_skip | {"shapes", "fingerprint"} - expected_fail
    assert main(["verify", "--diff", str(diff_path)]) == 1
    fail_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    assert sorted(line.split(":")[0] for line in fail_lines) == sorted(f"FAIL {n}" for n in expected_fail)


def test_clean_diff_passes_every_check(diff_path, base_dir, capsys):
    assert main(["verify", "--model", str(base_dir), "--diff", str(diff_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"PASS {name}" for name in CHECKS]


def test_without_model_only_integrity_runs(diff_path, capsys):
    assert main(["verify", "--diff", str(diff_path)]) == 0
    out = capsys.readouterr().out
    assert "SKIP shapes: no base model given" in out and "FAIL" not in out


def test_swapped_base_fails_fingerprint(diff_path, tmp_path, capsys):
    other = tmp_path / "other"
    make_tiny_llama(seed=7).save_pretrained(other)
    assert main(["verify", "--model", str(other), "--diff", str(diff_path)]) == 1
    fails = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and fails[0].startswith("FAIL fingerprint:") and "different base model" in fails[0]


def test_shape_mismatch_fails_shapes_and_skips_fingerprint(diff_path, base_dir):
    edit_config(diff_path, lambda m: m["tensors"]["model.layers.0.self_attn.q_proj"].__setitem__("shape", [64, 16]))
    results = {r.name: r for r in verify_diff(diff_path, make_tiny_llama())}
    assert results["shapes"].status == "fail" and "q_proj" in results["shapes"].reason
    assert results["fingerprint"].status == "skip"


def test_missing_fingerprint_is_a_failure(diff_path):
    edit_config(diff_path, lambda m: m.__setitem__("base_fingerprint", {}))
    results = {r.name: r for r in verify_diff(diff_path, make_tiny_llama())}
    assert results["fingerprint"].status == "fail" and "no base fingerprint" in results["fingerprint"].reason


def test_json_output(diff_path, capsys):
    edit_values(diff_path, add_to_first_value, rehash=False)
    assert main(["verify", "--diff", str(diff_path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and [c["name"] for c in report["checks"]] == list(CHECKS)


def test_unloadable_model_is_a_usage_error(diff_path, tmp_path, capsys):
    assert main(["verify", "--model", str(tmp_path / "absent"), "--diff", str(diff_path)]) == 2
    assert "absent" in capsys.readouterr().err
