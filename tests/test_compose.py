"""Composing diffs: a weighted union that merges like the inputs one after another, and overlap statistics."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import make_tiny_llama

from sparseft import SparseConfig, get_sparse_model
from sparseft.cli import main
from sparseft.compose import compose, linear_weights, overlap_stats, parse_weights
from sparseft.diffio import SparseDiff, read_diff, write_diff
from sparseft.errors import ConfigError, FingerprintMismatchError, UnverifiedBaseError
from sparseft.model import SparseModel
from sparseft.targets import find_targets

TARGETS = ["q_proj", "v_proj"]


def bf16_exact(values: torch.Tensor) -> torch.Tensor:
    """Values a bf16 diff stores without rounding, so in-memory and on-disk diffs agree bit for bit."""
    return values.to(torch.bfloat16).to(torch.float32)


def diff_with_masks(masks: dict[str, torch.Tensor], seed: int, base_seed: int = 0) -> SparseDiff:
    sparse = get_sparse_model(make_tiny_llama(base_seed), SparseConfig(density=0.1, target_modules=TARGETS), masks)
    gen = torch.Generator().manual_seed(seed)
    for layer in sparse.sparse_layers().values():
        layer.values.data = bf16_exact(torch.randn(layer.k, generator=gen) * 0.05 + 0.2)  # never exactly 0
    return sparse.to_diff()


def random_diff(seed: int, density: float = 0.1, base_seed: int = 0) -> SparseDiff:
    cfg = SparseConfig(density=density, target_modules=TARGETS, scorer="random", seed=seed)
    sparse = get_sparse_model(make_tiny_llama(base_seed), cfg)
    gen = torch.Generator().manual_seed(seed + 100)
    for layer in sparse.sparse_layers().values():
        layer.values.data = bf16_exact(torch.randn(layer.k, generator=gen) * 0.05)
    return sparse.to_diff()


def merged_weights(diff_dir) -> dict[str, torch.Tensor]:
    model = SparseModel.from_pretrained(make_tiny_llama(), diff_dir).merge_and_unload()
    return {n: layer.weight.detach().clone() for n, layer in find_targets(model, TARGETS).items()}


def test_diffs_selected_per_module_compose_and_the_result_reloads(tmp_path):
    # The composed config keeps the first input's allocation with an exact entry count: a record, not a request.
    cfg = SparseConfig(density=0.1, target_modules=TARGETS, allocation="per_module")
    a, b = (get_sparse_model(make_tiny_llama(), dataclasses.replace(cfg, seed=s)) for s in (1, 2))
    for sparse in (a, b):
        for layer in sparse.sparse_layers().values():
            layer.values.data = torch.full((layer.k,), 0.25)  # never cancels: the union keeps every entry
    a, b = a.to_diff(), b.to_diff()
    composed, _ = compose([a, b], base_weights=linear_weights(make_tiny_llama()))
    assert composed.config.allocation == "per_module" and composed.config.num_params == composed.num_entries > a.num_entries
    write_diff(composed, tmp_path / "c")
    assert read_diff(tmp_path / "c").num_entries == composed.num_entries


def test_disjoint_diffs_compose_to_applying_one_after_the_other(tmp_path):
    names = sorted(find_targets(make_tiny_llama(), TARGETS))
    evens = {n: torch.arange(0, 200, 2) for n in names}
    odds = {n: torch.arange(1, 201, 2) for n in names}
    a, b = diff_with_masks(evens, seed=1), diff_with_masks(odds, seed=2)
    composed, report = compose([a, b], base_weights=linear_weights(make_tiny_llama()))
    assert report.shared_entries == 0 and report.output_entries == a.num_entries + b.num_entries
    write_diff(composed, tmp_path / "c")

    base = make_tiny_llama()
    for name, layer in find_targets(base, TARGETS).items():  # A merged, then B merged on top
        flat = layer.weight.data.view(-1)
        for diff in (a, b):
            flat[diff.masks[name]] += diff.values[name].to(torch.float32)
    expected = {n: layer.weight for n, layer in find_targets(base, TARGETS).items()}
    for name, weight in merged_weights(tmp_path / "c").items():
        assert torch.equal(weight, expected[name])


def test_plus_one_then_minus_one_restores_the_base_exactly(tmp_path):
    a = random_diff(seed=3)
    composed, report = compose([a, a], weights=[1.0, -1.0])
    assert report.cancelled_entries == a.num_entries and composed.num_entries == 0
    assert report.shared_entries == a.num_entries and report.sign_conflicts == a.num_entries
    write_diff(composed, tmp_path / "zero")
    base = {n: layer.weight for n, layer in find_targets(make_tiny_llama(), TARGETS).items()}
    for name, weight in merged_weights(tmp_path / "zero").items():
        assert torch.equal(weight, base[name])


def test_weights_scale_and_shared_entries_sum():
    a, b = random_diff(seed=4, density=0.5), random_diff(seed=5, density=0.5)
    composed, report = compose([a, b], weights=[1.0, 0.5], value_dtype="float32")
    assert report.shared_entries > 0
    name = sorted(a.masks)[0]
    dense = torch.zeros(32 * 32, dtype=torch.float64)
    dense[a.masks[name]] += a.values[name].double()
    dense[b.masks[name]] += 0.5 * b.values[name].double()
    got = torch.zeros_like(dense)
    got[composed.masks[name]] = composed.values[name].double()
    torch.testing.assert_close(got, dense, rtol=0, atol=1e-7)
    assert torch.equal(composed.masks[name], torch.sort(composed.masks[name]).values)


def test_diffs_of_different_bases_are_refused():
    with pytest.raises(FingerprintMismatchError, match="different base"):
        compose([random_diff(seed=1), random_diff(seed=1, base_seed=7)], names=["a", "b"])
    with pytest.raises(FingerprintMismatchError):
        overlap_stats(random_diff(seed=1), random_diff(seed=1, base_seed=7))
    with pytest.raises(FingerprintMismatchError):  # checked against the base itself
        compose([random_diff(seed=1), random_diff(seed=1, base_seed=7)], base_weights=linear_weights(make_tiny_llama()))


def test_a_diff_recording_no_fingerprint_is_refused_unless_allowed_not_called_another_base():
    # Compared with a fingerprint, "none" read as a different base; two diffs recording none passed unchecked.
    a, b = random_diff(seed=1), random_diff(seed=2)
    unverified = dataclasses.replace(b, base_fingerprint={})
    for pair in ([a, unverified], [unverified, dataclasses.replace(a, base_fingerprint={})]):
        with pytest.raises(UnverifiedBaseError, match="records no base fingerprint.*--allow-unverified-base") as info:
            compose(pair, names=["a", "b"])
        assert "different base" not in str(info.value)
        with pytest.raises(UnverifiedBaseError):
            overlap_stats(*pair)
    composed, _ = compose([a, unverified], names=["a", "b"], allow_unverified_base=True)
    assert composed.base_fingerprint == a.base_fingerprint
    assert overlap_stats(a, unverified, allow_unverified_base=True).entries_b == b.num_entries


def test_disjoint_modules_get_the_fingerprint_of_their_union(tmp_path):
    names = sorted(find_targets(make_tiny_llama(), TARGETS))
    q_only = diff_with_masks({n: torch.arange(5) for n in names if "q_proj" in n}, seed=1)
    v_only = diff_with_masks({n: torch.arange(5) for n in names if "v_proj" in n}, seed=2)
    composed, _ = compose([q_only, v_only], base_weights=linear_weights(make_tiny_llama()))
    write_diff(composed, tmp_path / "qv")
    SparseModel.from_pretrained(make_tiny_llama(), tmp_path / "qv")  # the fingerprint fits the base
    with pytest.raises(FingerprintMismatchError):
        SparseModel.from_pretrained(make_tiny_llama(seed=3), tmp_path / "qv")


def test_overlap_stats_of_a_diff_with_itself_and_its_negation():
    a = random_diff(seed=6)
    same = overlap_stats(a, a)
    assert same.shared_entries == a.num_entries and same.jaccard == 1.0
    assert same.cosine_shared == pytest.approx(1.0) and same.sign_agreement == 1.0
    negated, _ = compose([a], weights=[-1.0])
    opposite = overlap_stats(a, negated)
    assert opposite.cosine_shared == pytest.approx(-1.0) and opposite.sign_agreement == 0.0


def test_overlap_stats_counts_shared_entries_per_module():
    names = sorted(find_targets(make_tiny_llama(), TARGETS))
    a = diff_with_masks({names[0]: torch.arange(0, 10), names[1]: torch.arange(0, 4)}, seed=1)
    b = diff_with_masks({names[0]: torch.arange(5, 15)}, seed=2)
    with pytest.raises(ConfigError, match="change different modules"):
        overlap_stats(a, b)
    stats = overlap_stats(a, b, base_weights=linear_weights(make_tiny_llama()))
    assert stats.shared_entries == 5 and stats.jaccard == pytest.approx(5 / 19)
    assert stats.per_module[names[0]]["shared"] == 5
    assert stats.per_module[names[0]]["jaccard"] == pytest.approx(5 / 15)
    assert stats.per_module[names[1]] == {"entries_a": 4, "entries_b": 0, "shared": 0, "jaccard": 0.0, "cosine_shared": None}


def test_parse_weights_errors_are_clear():
    assert parse_weights("1,-0.5", 2) == [1.0, -0.5]
    with pytest.raises(ConfigError, match="2 weight"):
        parse_weights("1,2", 3)
    with pytest.raises(ConfigError, match="comma-separated numbers"):
        parse_weights("1;2", 2)


def test_cli_compose_and_diff_stats(tmp_path, capsys):
    write_diff(random_diff(seed=1), tmp_path / "a")
    write_diff(random_diff(seed=2), tmp_path / "b")
    assert main(["compose", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "1,0.5", "--out", str(tmp_path / "c")]) == 0
    assert "sign conflicts" in capsys.readouterr().out
    composed = read_diff(tmp_path / "c")
    assert composed.provenance["composed_from"][1]["weight"] == 0.5

    assert main(["diff-stats", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert 0 < stats["jaccard"] < 1 and set(stats["per_module"]) == set(composed.masks)

    assert main(["compose", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "1", "--out", str(tmp_path / "d")]) == 2
    assert "1 weight(s) for 2 diff(s)" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_cli_compose_whose_sum_overflows_the_value_dtype_says_so_and_writes_nothing(tmp_path, capsys):
    # Before, the sums became Inf in float16 and the write reported "NaN/Inf values" of the output.
    write_diff(random_diff(seed=1), tmp_path / "a")
    out = tmp_path / "big"
    assert main(["compose", str(tmp_path / "a"), "--weights", "1e7", "--value-dtype", "float16", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "beyond what float16 values hold (at most 6.55e+04)" in err and "--value-dtype float32" in err
    assert "NaN/Inf" not in err and not out.exists()
    assert main(["compose", str(tmp_path / "a"), "--weights", "1e7", "--value-dtype", "float32", "--out", str(out)]) == 0


def test_cli_compose_of_different_modules_needs_the_base(tmp_path, tiny_model_dir, capsys):
    names = sorted(find_targets(make_tiny_llama(), TARGETS))
    write_diff(diff_with_masks({n: torch.arange(5) for n in names if "q_proj" in n}, seed=1), tmp_path / "q")
    write_diff(diff_with_masks({n: torch.arange(5) for n in names if "v_proj" in n}, seed=2), tmp_path / "v")
    args = ["compose", str(tmp_path / "q"), str(tmp_path / "v"), "--out", str(tmp_path / "qv")]
    assert main(args) == 2
    assert "--model BASE" in capsys.readouterr().err and not (tmp_path / "qv").exists()
    assert main(args + ["--model", str(tiny_model_dir)]) == 0
    assert read_diff(tmp_path / "qv").num_entries == 20


def test_cli_compose_and_diff_stats_check_diffs_over_a_quantized_base_with_quantize(tmp_path, tiny_model_dir, capsys):
    pytest.importorskip("torchao")
    from sparseft.quantize import quantize_base, quantize_sparse_model

    names = sorted(find_targets(make_tiny_llama(), TARGETS))
    for module, seed in (("q_proj", 1), ("v_proj", 2)):  # different modules: only the base can vouch for both
        config = SparseConfig(density=0.1, target_modules=TARGETS)
        sparse = get_sparse_model(make_tiny_llama(), config, {n: torch.arange(5) for n in names if module in n})
        for layer in sparse.sparse_layers().values():
            layer.values.data.fill_(0.5)  # not 0: compose drops entries that sum to exactly 0
        write_diff(quantize_sparse_model(sparse, "int8").to_diff(), tmp_path / module)  # fingerprint over the codes
    diffs, model = [str(tmp_path / "q_proj"), str(tmp_path / "v_proj")], ["--model", str(tiny_model_dir)]
    out = tmp_path / "qv"
    assert main(["compose", *diffs, "--out", str(out), *model]) == 2
    assert "load it with --quantize int8" in capsys.readouterr().err and not out.exists()
    assert main(["compose", *diffs, "--out", str(out), "--quantize", "int8"]) == 2  # nothing to quantize
    assert "give it with --model" in capsys.readouterr().err and not out.exists()
    assert main(["compose", str(tmp_path / "missing"), *diffs, "--out", str(out), "--quantize", "int8"]) == 2
    assert "give it with --model" in capsys.readouterr().err  # said before any diff is read

    assert main(["compose", *diffs, "--out", str(out), *model, "--quantize", "int8"]) == 0
    assert "sign conflicts" in capsys.readouterr().out
    assert set(read_diff(out).base_fingerprint) == {"Int8Tensor"}
    loaded = SparseModel.from_pretrained(quantize_base(make_tiny_llama(), "int8"), out)  # loads onto that base
    assert sum(layer.k for layer in loaded.sparse_layers().values()) == 20
    assert main(["diff-stats", *diffs, "--json", *model, "--quantize", "int8"]) == 0
    assert json.loads(capsys.readouterr().out)["jaccard"] == 0
