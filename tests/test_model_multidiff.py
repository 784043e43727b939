"""Several named diffs active at once in one SparseModel: composition, exact unmerge, clear errors."""

import pytest
import torch

from conftest import make_tiny_llama
from sparseft import SparseConfig, SparseModel, get_sparse_model
from sparseft import model as sparseft_model
from sparseft.compose import compose, linear_weights
from sparseft.diffio import read_diff, write_diff
from sparseft.errors import ConfigError, FingerprintMismatchError, MergeStateError, UnknownDiffError

Q0, V0, Q1 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj"


def save_diff(path, values_at, dtype=torch.float32):
    """A diff of the seed-0 tiny model (in ``dtype``) with ``values_at = {module: (flat indices, values)}``."""
    base = make_tiny_llama().to(dtype)
    masks = {m: torch.as_tensor(idx) for m, (idx, _) in values_at.items()}
    cfg = SparseConfig(num_params=sum(len(i) for i in masks.values()), target_modules=["q_proj", "v_proj"],
                       value_dtype="float32")
    model = get_sparse_model(base, cfg, masks)
    for module, (_, values) in values_at.items():
        model.sparse_layers()[module].values.data.copy_(torch.as_tensor(values, dtype=torch.float32))
    return model.save_pretrained(path)


def random_values(k, seed):
    return torch.randn(k, generator=torch.Generator().manual_seed(seed)) * 0.1


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def base_weights(model):
    """Every linear weight of the model by module name (a wrapped one under its layer's name)."""
    return {n.removesuffix(".base_layer"): w.detach().clone() for n, w in linear_weights(model.base_model).items()}


def snapshot(model):
    """Everything load_diff / set_active could change."""
    layers = model.sparse_layers()
    return (
        model.diff_names, model.active_diffs, sorted(layers),
        {n: (sorted(layer.frozen_deltas), dict(layer.active)) for n, layer in layers.items()},
        {n: t.detach().clone() for n, t in model.state_dict().items()},
    )


def assert_same_snapshot(a, b):
    assert a[:4] == b[:4]
    assert a[4].keys() == b[4].keys() and all(torch.equal(a[4][n], b[4][n]) for n in a[4])


@pytest.mark.parametrize("forward_mode", ["inplace", "unmerged"])
def test_disjoint_diffs_active_at_once_equal_their_composition(tmp_path, tiny_batch, forward_mode):
    # B touches v_proj, which A leaves plain, and q_proj entries disjoint from A's; B is weighted 0.5.
    a = save_diff(tmp_path / "a", {Q0: ([1, 7, 40], random_values(3, 0))})
    b = save_diff(tmp_path / "b", {Q0: ([2, 8, 41], random_values(3, 1)), V0: ([5, 100], random_values(2, 2))})
    composed, _ = compose([read_diff(a), read_diff(b)], weights=[1.0, 0.5],
                          base_weights=linear_weights(make_tiny_llama()), value_dtype="float32")
    write_diff(composed, tmp_path / "ab")

    both = SparseModel.from_pretrained(make_tiny_llama(), a)
    both.load_diff(b, name="b", weight=0.5)
    one = SparseModel.from_pretrained(make_tiny_llama(), tmp_path / "ab")
    for model in (both, one):
        for layer in model.sparse_layers().values():
            layer.set_kernels(forward_mode=forward_mode)
    assert both.active_diffs == {"default": 1.0, "b": 0.5}
    exact = {"rtol": 0, "atol": 0} if forward_mode == "inplace" else {}  # unmerged sums entries in another order
    torch.testing.assert_close(logits(both, tiny_batch), logits(one, tiny_batch), **exact)
    assert not torch.equal(logits(both, tiny_batch), logits(SparseModel.from_pretrained(make_tiny_llama(), a), tiny_batch))

    both.merge()
    one.merge()
    merged_both = base_weights(both)
    assert all(torch.equal(merged_both[name], weight) for name, weight in base_weights(one).items())


def test_same_entries_with_plus_and_minus_one_merge_to_the_base_bitwise(tmp_path, tiny_batch):
    # Values equal to the base entries: W + W = 2W and 2W - W = W are exact in fp32.
    idx = torch.tensor([0, 9, 33, 500, 1023])
    w = make_tiny_llama().get_submodule(Q0).weight.detach().reshape(-1)[idx]
    diff = save_diff(tmp_path / "a", {Q0: (idx, w)})
    model = SparseModel.from_pretrained(make_tiny_llama(), diff)
    model.load_diff(diff, name="minus", weight=-1.0)
    pristine = base_weights(model)

    torch.testing.assert_close(logits(model, tiny_batch), logits(make_tiny_llama(), tiny_batch), rtol=0, atol=0)
    model.merge()
    merged = base_weights(model)
    assert all(torch.equal(merged[n], pristine[n]) for n in pristine)
    with pytest.raises(MergeStateError):
        model.set_active(["default"])
    model.unmerge()
    model.set_active(["default"])
    model.merge()
    assert not torch.equal(base_weights(model)[Q0], pristine[Q0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_with_three_overlapping_diffs_restores_every_weight_bitwise(tmp_path, tiny_batch, dtype):
    shared = [3, 17, 200]  # on every diff: the weighted sums round in the weight's dtype
    a = save_diff(tmp_path / "a", {Q0: (shared + [300], random_values(4, 0))}, dtype)
    b = save_diff(tmp_path / "b", {Q0: (shared, random_values(3, 1)), Q1: ([4, 5], random_values(2, 2))}, dtype)
    c = save_diff(tmp_path / "c", {Q0: (shared, random_values(3, 3)), V0: ([0, 64], random_values(2, 4))}, dtype)
    model = SparseModel.from_pretrained(make_tiny_llama().to(dtype), a)
    model.load_diff(b, name="b", weight=0.37)
    model.load_diff(c, name="c", weight=-2.0)
    pristine = base_weights(model)
    unmerged_logits = logits(model, tiny_batch)

    model.merge()
    merged = base_weights(model)
    assert {n for n in pristine if not torch.equal(merged[n], pristine[n])} == {Q0, Q1, V0}
    torch.testing.assert_close(logits(model, tiny_batch), unmerged_logits, rtol=0, atol=0)
    model.unmerge()
    assert all(torch.equal(w, pristine[n]) for n, w in base_weights(model).items())


def test_merge_applies_the_diffs_one_after_the_other(tmp_path):
    a = save_diff(tmp_path / "a", {Q0: ([3, 4], random_values(2, 0))})
    b = save_diff(tmp_path / "b", {Q0: ([4, 5], random_values(2, 1))})
    model = SparseModel.from_pretrained(make_tiny_llama().to(torch.bfloat16), a)
    model.load_diff(b, name="b", weight=0.5)
    expected = model.sparse_layers()[Q0].weight.detach().clone().reshape(-1)
    for path, weight in ((a, 1.0), (b, 0.5)):  # the rounding rule: each weighted diff rounded into bf16 in turn
        diff = read_diff(path)
        expected.index_add_(0, diff.masks[Q0], (diff.values[Q0].float() * weight).to(torch.bfloat16))
    model.merge()
    assert torch.equal(model.sparse_layers()[Q0].weight.reshape(-1), expected)


def test_set_active_chooses_diffs_and_weights(tmp_path, tiny_batch):
    a = save_diff(tmp_path / "a", {Q0: ([1, 2], random_values(2, 0))})
    b = save_diff(tmp_path / "b", {V0: ([1, 2], random_values(2, 1))})
    model = SparseModel.from_pretrained(make_tiny_llama(), a)
    model.load_diff(b, name="b", active=False)
    assert model.diff_names == ["default", "b"] and model.active_diffs == {"default": 1.0}
    only_a = logits(model, tiny_batch)

    model.set_active([])
    torch.testing.assert_close(logits(model, tiny_batch), logits(make_tiny_llama(), tiny_batch), rtol=0, atol=0)
    model.set_active("b")
    torch.testing.assert_close(
        logits(model, tiny_batch), logits(SparseModel.from_pretrained(make_tiny_llama(), b), tiny_batch), rtol=0, atol=0
    )
    model.set_active(["default"], weights=[1])
    torch.testing.assert_close(logits(model, tiny_batch), only_a, rtol=0, atol=0)


def test_training_with_another_diff_active_trains_the_default_only(tmp_path, tiny_batch):
    b = save_diff(tmp_path / "b", {Q0: ([5, 6], random_values(2, 1)), V0: ([7], random_values(1, 2))})
    masks = {Q0: torch.tensor([1, 2, 3]), Q1: torch.tensor([10, 11])}
    cfg = SparseConfig(num_params=5, target_modules=["q_proj", "v_proj"], value_dtype="float32")
    model = get_sparse_model(make_tiny_llama(), cfg, masks)
    model.load_diff(b, name="b")
    # Reference: the same masks trained on a base with b merged into its weights.
    with_b = SparseModel.from_pretrained(make_tiny_llama(), b).merge_and_unload()
    reference = get_sparse_model(with_b, cfg, masks)

    for m in (model, reference):
        m(**tiny_batch).loss.backward()
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert trainable == [id(model.sparse_layers()[name].values) for name in masks]
    for name in masks:
        grad = model.sparse_layers()[name].values.grad
        torch.testing.assert_close(grad, reference.sparse_layers()[name].values.grad, rtol=1e-5, atol=1e-7)
        assert grad.abs().sum() > 0
    frozen = model.sparse_layers()[V0]
    assert frozen.k == 0 and not frozen.values.requires_grad
    assert torch.equal(frozen.frozen_deltas["b"].values, read_diff(b).values[V0].float())


def test_save_pretrained_of_one_named_diff(tmp_path):
    a = save_diff(tmp_path / "a", {Q0: ([1, 2], random_values(2, 0))})
    b = save_diff(tmp_path / "b", {Q0: ([2, 3], random_values(2, 1)), V0: ([4], random_values(1, 2))})
    model = SparseModel.from_pretrained(make_tiny_llama(), a)
    model.save_pretrained(tmp_path / "a-before")
    model.load_diff(b, name="b", weight=0.5)

    model.save_pretrained(tmp_path / "a-after")  # the default diff: A's modules only, bytes as before
    before, after = (tmp_path / d / "sparse_delta.safetensors" for d in ("a-before", "a-after"))
    assert before.read_bytes() == after.read_bytes()
    model.save_pretrained(tmp_path / "b-again", diff_name="b")
    original, again = read_diff(b), read_diff(tmp_path / "b-again")
    assert original.masks.keys() == again.masks.keys()
    for module in original.masks:
        assert torch.equal(original.masks[module], again.masks[module])
        assert torch.equal(original.values[module], again.values[module])
    assert again.base_fingerprint == original.base_fingerprint
    with pytest.raises(UnknownDiffError, match="'c'"):
        model.save_pretrained(tmp_path / "c", diff_name="c")


def test_bad_names_double_loads_and_foreign_bases_raise_and_change_nothing(tmp_path):
    a = save_diff(tmp_path / "a", {Q0: ([1, 2], random_values(2, 0))})
    b = save_diff(tmp_path / "b", {V0: ([1, 2], random_values(2, 1))})
    other_base = make_tiny_llama(seed=1)
    foreign = get_sparse_model(other_base, SparseConfig(num_params=2, target_modules=["k_proj"]), {
        "model.layers.0.self_attn.k_proj": torch.tensor([1, 2])}).save_pretrained(tmp_path / "foreign")
    model = SparseModel.from_pretrained(make_tiny_llama(), a)
    model.load_diff(b, name="b")
    before = snapshot(model)

    cases = [
        (lambda: model.load_diff(b, name="b"), ConfigError, "already loaded"),
        (lambda: model.load_diff(a, name="default"), ConfigError, "already loaded"),
        (lambda: model.load_diff(b, name="a.b"), ConfigError, "letters, digits"),
        (lambda: model.load_diff(b, name="keys"), ConfigError, "reserved"),
        (lambda: model.load_diff(b, name="c", weight=float("nan")), ConfigError, "finite"),
        (lambda: model.load_diff(foreign, name="foreign"), FingerprintMismatchError, "different base"),
        (lambda: model.load_diff(tmp_path / "missing", name="m"), FileNotFoundError, "missing"),
        (lambda: model.set_active(["default", "nope"]), UnknownDiffError, "'nope'"),
        (lambda: model.set_active(["b", "b"]), ConfigError, "twice"),
        (lambda: model.set_active(["default", "b"], weights=[1.0]), ConfigError, "1 weight"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
        assert_same_snapshot(snapshot(model), before)

    model.merge()
    merged = snapshot(model)
    with pytest.raises(MergeStateError, match="unmerge"):
        model.load_diff(b, name="c")
    assert_same_snapshot(snapshot(model), merged)


def test_a_failure_while_attaching_takes_out_what_was_added(tmp_path, monkeypatch):
    a = save_diff(tmp_path / "a", {Q0: ([1, 2], random_values(2, 0))})
    b = save_diff(tmp_path / "b", {Q0: ([3], random_values(1, 1)), Q1: ([4], random_values(1, 2)), V0: ([5], random_values(1, 3))})
    model = SparseModel.from_pretrained(make_tiny_llama(), a)
    before = snapshot(model)
    real, calls = sparseft_model.FrozenDelta, []

    def fail_on_the_third(*args):
        calls.append(args)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(*args)

    monkeypatch.setattr(sparseft_model, "FrozenDelta", fail_on_the_third)
    with pytest.raises(RuntimeError, match="out of memory"):
        model.load_diff(b, name="b")
    assert len(calls) == 3
    assert_same_snapshot(snapshot(model), before)  # Q1 and V0 unwrapped again, no FrozenDelta "b" left on Q0
