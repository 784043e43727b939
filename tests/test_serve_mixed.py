"""The unmerged mixed-diff forward: delta.mixed_delta's math, and serve.mixed's hooks against merged models."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_llama
from serve_fixtures import make_diff, make_tokenizer
from sparseft import SparseModel
from sparseft.delta import MixedEntries, mixed_delta
from sparseft.serve import DiffRegistry, Engine
from sparseft.serve.mixed import MixedDiffs


def random_entries(out_features, in_features, sizes, seed=0):
    """A MixedEntries with one slot per size, and the dense S of each slot."""
    gen = torch.Generator().manual_seed(seed)
    dense, flats, values = [], [], []
    for k in sizes:
        flat = torch.randperm(out_features * in_features, generator=gen)[:k]
        vals = torch.randn(k, generator=gen)
        s = torch.zeros(out_features * in_features)
        s[flat] = vals
        dense.append(s.view(out_features, in_features))
        flats.append(flat)
        values.append(vals)
    entries = MixedEntries([(f.int(), v) for f, v in zip(flats, values)], out_features, in_features)
    return entries, dense


@pytest.mark.parametrize("shape", [(5,), (5, 3)])  # (batch, in) and (batch, tokens, in)
def test_mixed_delta_adds_each_rows_own_diff_and_nothing_for_base_rows(shape):
    entries, dense = random_entries(6, 7, sizes=[4, 9, 0])
    x = torch.randn(*shape, 7, generator=torch.Generator().manual_seed(1))
    row_diff = torch.tensor([1, -1, 0, 1, 2])
    delta = mixed_delta(x, row_diff, entries)
    assert delta.shape == (*shape, 6)
    for b, slot in enumerate(row_diff.tolist()):
        expected = torch.zeros(*shape[1:], 6) if slot < 0 else x[b] @ dense[slot].T
        torch.testing.assert_close(delta[b], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(delta[1], torch.zeros_like(delta[1])) and torch.equal(delta[4], torch.zeros_like(delta[4]))


def test_a_batch_without_diffs_adds_nothing():
    entries, _ = random_entries(4, 4, sizes=[3])
    assert torch.equal(mixed_delta(torch.ones(2, 4), torch.tensor([-1, -1]), entries), torch.zeros(2, 4))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    paths = [make_diff(root / f"d{i}", seed=i + 1) for i in range(3)]
    engine = Engine(make_tiny_llama(), make_tokenizer())
    registry = DiffRegistry(engine.validated_entries)
    return engine, [registry.load(f"d{i}", p) for i, p in enumerate(paths)], paths


def merged_logits(path, ids):
    model = SparseModel.from_pretrained(make_tiny_llama(), path).merge_and_unload()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_mixed_batch_matches_each_diff_merged_and_leaves_the_base_untouched(loaded):
    engine, diffs, paths = loaded
    model = engine.model
    before = {n: t.clone() for n, t in model.state_dict().items()}
    mixed = MixedDiffs(model)
    row_diffs = [diffs[2], None, diffs[0], diffs[2], diffs[1]]
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(0)).repeat(len(row_diffs), 1)
    mixed.set_rows(row_diffs)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    mixed.close()
    with torch.no_grad():
        base = model(input_ids=ids[:1]).logits[0]
    gap = 0.0
    for row, diff in enumerate(row_diffs):
        expected = base if diff is None else merged_logits(paths[diffs.index(diff)], ids[:1])[0]
        gap = max(gap, (logits[row] - expected).abs().max().item())
        assert torch.equal(logits[row].argmax(-1), expected.argmax(-1))
    assert gap < 1e-4  # x Wᵀ + x Sᵀ vs x (W + S)ᵀ: fp32 rounding only (docs/serving.md gives the measured gap)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_removing_a_diff_keeps_the_others_on_their_rows(loaded):
    engine, diffs, paths = loaded
    mixed = MixedDiffs(engine.model)
    for diff in diffs:
        mixed.slot_of(diff)
    mixed.remove([diffs[0]])
    assert mixed.diffs == diffs[1:]
    assert_one_row_matches_merged(engine, mixed, diffs[2], paths[2])


def test_adding_diffs_at_once_gives_the_slots_slot_of_would(loaded):
    engine, diffs, paths = loaded
    mixed = MixedDiffs(engine.model)
    mixed.slot_of(diffs[1])
    mixed.add([diffs[2], diffs[1], diffs[0]])  # the one already held keeps its slot
    assert mixed.diffs == [diffs[1], diffs[2], diffs[0]]
    assert [mixed.slot_of(d) for d in diffs] == [2, 0, 1]
    assert_one_row_matches_merged(engine, mixed, diffs[0], paths[0])


@pytest.mark.parametrize(("dtype", "bytes_per_entry"), [(torch.bfloat16, 6), (torch.float32, 8)])
def test_loaded_entries_cost_an_int32_index_plus_a_value_in_the_weights_dtype(tmp_path, dtype, bytes_per_entry):
    engine = Engine(make_tiny_llama().to(dtype), make_tokenizer())
    diff = DiffRegistry(engine.validated_entries).load("d", make_diff(tmp_path / "d", seed=1))
    mixed = MixedDiffs(engine.model)
    mixed.slot_of(diff)
    assert mixed.bytes_held() == bytes_per_entry * diff.num_entries
    mixed.close()


def test_tables_reference_the_registrys_entries_instead_of_copying_them(loaded):
    engine, diffs, _ = loaded
    mixed = MixedDiffs(engine.model)
    mixed.add(diffs)
    for name, hook in mixed.hooks.items():
        for slot, diff in enumerate(diffs):
            flat, values = diff.entries[name]
            assert flat.dtype == torch.int32  # half of int64's bytes: the tiny model's weights are far below 2**31
            held_flat, held_values = hook.entries.per_slot[slot]
            assert held_flat.data_ptr() == flat.data_ptr() and held_values.data_ptr() == values.data_ptr()
    mixed.close()


def test_a_slot_without_entries_on_a_layer_adds_nothing_there():
    one_slot, dense = random_entries(3, 4, sizes=[2])
    entries = MixedEntries([*one_slot.per_slot, None], 3, 4)  # slot 1: a diff that skips this weight
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
    delta = mixed_delta(x, torch.tensor([1, 0]), entries)
    assert torch.equal(delta[0], torch.zeros(3))
    torch.testing.assert_close(delta[1], x[1] @ dense[0].T, rtol=1e-6, atol=1e-6)


def assert_one_row_matches_merged(engine, mixed, diff, path):
    """One row served through ``mixed`` with ``diff`` gives the logits of that diff merged; closes ``mixed``."""
    ids = torch.tensor([[1, 10, 20, 30]])
    mixed.set_rows([diff])
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits
    mixed.close()
    torch.testing.assert_close(logits, merged_logits(path, ids), rtol=0, atol=1e-4)
