import copy

import pytest
import torch

from conftest import make_tiny_llama
from sparseft import SparseConfig, SparseModel, get_sparse_model, select
from sparseft.errors import ConfigError, FingerprintMismatchError, InvalidIndicesError, ShapeMismatchError


def train_a_few_steps(model, batch, steps=5, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return opt, losses


def state_bytes(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def test_only_values_train_and_optimizer_holds_2k(tiny_model, tiny_batch):
    cfg = SparseConfig(density=0.05, scorer="random", seed=0)
    model = get_sparse_model(tiny_model, cfg)
    k = model.num_trainable()
    assert k == sum(layer.k for layer in model.sparse_layers().values()) > 0
    opt, losses = train_a_few_steps(model, tiny_batch, steps=3)
    for name, p in model.base_model.named_parameters():
        if not name.endswith(".values"):
            assert p.grad is None, name
    state_numel = sum(t.numel() for s in opt.state.values() for n, t in s.items() if n != "step")
    assert state_numel == 2 * k


def test_round_trip_train_save_load_merge_unmerge(tiny_batch, tmp_path):
    base = make_tiny_llama()
    pristine = state_bytes(base)
    model = get_sparse_model(base, SparseConfig(density=0.05, scorer="magnitude", value_dtype="float32"))
    _, losses = train_a_few_steps(model, tiny_batch, steps=8)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        trained_logits = model(**tiny_batch).logits
    model.save_pretrained(tmp_path / "diff")

    fresh = make_tiny_llama()
    loaded = SparseModel.from_pretrained(fresh, tmp_path / "diff")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**tiny_batch).logits, trained_logits, rtol=0, atol=0)
        loaded.merge()
        torch.testing.assert_close(loaded(**tiny_batch).logits, trained_logits, rtol=1e-6, atol=1e-6)
        loaded.unmerge()
    for name, t in fresh.state_dict().items():
        name = name.replace(".base_layer", "")
        if name.endswith(".values"):
            continue
        assert torch.equal(t, pristine[name]), name


def test_merge_and_unload_gives_plain_model_with_same_outputs(tiny_model, tiny_batch):
    model = get_sparse_model(tiny_model, SparseConfig(density=0.05, value_dtype="float32"))
    train_a_few_steps(model, tiny_batch, steps=3)
    with torch.no_grad():
        expected = model(**tiny_batch).logits
    plain = model.merge_and_unload()
    assert not any("values" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain(**tiny_batch).logits, expected, rtol=1e-6, atol=1e-6)


def test_generate_delegates(tiny_model):
    model = get_sparse_model(tiny_model, SparseConfig(density=0.05))
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_bf16_model_round_trip_bitwise(tiny_batch, tmp_path):
    base = make_tiny_llama().to(torch.bfloat16)
    pristine = state_bytes(base)
    model = get_sparse_model(base, SparseConfig(density=0.05))
    with torch.no_grad():
        for layer in model.sparse_layers().values():
            layer.values.normal_(0, 1e-2)
    model.merge()
    model.unmerge()
    for name, t in base.state_dict().items():
        if not name.endswith(".values"):
            assert torch.equal(t.view(torch.int16), pristine[name.replace(".base_layer", "")].view(torch.int16))


def test_a_model_merge_failing_part_way_leaves_every_weight_the_base(tiny_model):
    model = get_sparse_model(tiny_model, SparseConfig(density=0.05, scorer="random", seed=0))
    with torch.no_grad():
        for values in model.sparse_parameters():
            values.normal_(0, 1e-2)
    pristine = state_bytes(tiny_model)
    last = list(model.sparse_layers().values())[-1]
    last.indices[-1] = last.weight.numel() + 5  # the last layer fails after the others were merged
    with pytest.raises((IndexError, RuntimeError)):
        model.merge()
    assert not model.merged
    for name, t in tiny_model.state_dict().items():
        assert torch.equal(t, pristine[name]), name


def test_bad_masks_leave_model_unchanged(tiny_model):
    pristine = state_bytes(tiny_model)
    name = "model.layers.0.self_attn.q_proj"
    for masks, error in [
        ({name: torch.tensor([3, 1, 2])}, InvalidIndicesError),
        ({name: torch.tensor([1, 1, 2])}, InvalidIndicesError),
        ({name: torch.tensor([0, 10**6])}, InvalidIndicesError),
        ({"model.layers.0.nonexistent": torch.tensor([0])}, ShapeMismatchError),
    ]:
        with pytest.raises(error):
            get_sparse_model(tiny_model, SparseConfig(density=0.05), masks=masks)
        assert set(tiny_model.state_dict()) == set(pristine)
        assert all(p.requires_grad for p in tiny_model.parameters())


def test_unknown_targets_are_named(tiny_model):
    with pytest.raises(ConfigError, match="q_proj"):
        get_sparse_model(tiny_model, SparseConfig(target_modules=["nope"]))


def test_fingerprint_refuses_other_base(tiny_model, tmp_path):
    get_sparse_model(copy.deepcopy(tiny_model), SparseConfig(density=0.05)).save_pretrained(tmp_path / "d")
    other = make_tiny_llama(seed=7)
    pristine = state_bytes(other)
    with pytest.raises(FingerprintMismatchError, match="different base"):
        SparseModel.from_pretrained(other, tmp_path / "d")
    assert {n: t for n, t in other.state_dict().items()}.keys() == pristine.keys()


def test_fp32_diff_applies_to_bf16_base(tmp_path, tiny_batch):
    base = make_tiny_llama()
    get_sparse_model(base, SparseConfig(density=0.05)).save_pretrained(tmp_path / "d")
    served = make_tiny_llama().to(torch.bfloat16)
    SparseModel.from_pretrained(served, tmp_path / "d")  # no error: bf16 fingerprint recorded too


def test_a_module_with_k_0_has_no_trainable_parameter(tiny_batch, tmp_path):
    # k=0 is normal (per_module rounding, global allocation, --masks from a diff with empty modules).
    # Its forward skips the autograd function, so a trainable `values` would never get a gradient,
    # which DDP reports as an unused parameter.
    masks = select(make_tiny_llama(), SparseConfig(density=0.05, scorer="random"))
    empty = "model.layers.1.self_attn.k_proj"
    masks[empty] = torch.zeros(0, dtype=torch.long)
    model = get_sparse_model(make_tiny_llama(), SparseConfig(density=0.05, value_dtype="float32"), masks)
    layers = model.sparse_layers()
    assert layers[empty].k == 0 and not layers[empty].values.requires_grad
    assert all(layer.values.requires_grad for n, layer in layers.items() if n != empty)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(masks) - 1 and not any(empty in n for n in trainable)
    assert model.num_trainable() == sum(m.numel() for m in masks.values())
    train_a_few_steps(model, tiny_batch, steps=2)
    model.save_pretrained(tmp_path / "d")

    loaded = SparseModel.from_pretrained(make_tiny_llama(), tmp_path / "d", is_trainable=True)
    layers = loaded.sparse_layers()
    assert set(layers) == set(masks) and layers[empty].k == 0  # the diff still lists the empty module
    assert not layers[empty].values.requires_grad
    assert all(layer.values.requires_grad for n, layer in layers.items() if n != empty)
    with torch.no_grad():
        before = loaded(**tiny_batch).logits
        loaded.merge()
        torch.testing.assert_close(loaded(**tiny_batch).logits, before, rtol=1e-6, atol=1e-6)
        loaded.unmerge()


def test_empty_masks_are_refused_with_a_clear_error(tiny_model):
    pristine = state_bytes(tiny_model)
    with pytest.raises(ConfigError, match="masks select no module"):
        get_sparse_model(tiny_model, SparseConfig(density=0.05), masks={})
    assert all(p.requires_grad for p in tiny_model.parameters())
    assert all(torch.equal(t, pristine[n]) for n, t in tiny_model.state_dict().items())
