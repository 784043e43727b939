import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sparseft.delta import (
    MergedEntries,
    SparseDeltaFunction,
    SparseLinear,
    add_entries,
    delta_matmul,
    round_values,
)
from sparseft.errors import MergeStateError, ShapeMismatchError
from sparseft.kernels import sampled_weight_grad


def random_indices(numel: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(numel, generator=gen)[:k]).values


def test_gradcheck_float64_odd_shapes():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 7, dtype=torch.float64)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    idx = random_indices(77, 13)
    vals = torch.randn(13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SparseDeltaFunction.apply, (x, w, b, idx, vals))


def test_values_gradient_equals_dense_gradient_at_the_chosen_entries():
    torch.manual_seed(0)
    lin = nn.Linear(9, 6, bias=False)
    x = torch.randn(4, 9)
    idx = random_indices(54, 10)
    dense = lin.weight.detach().clone().requires_grad_(True)
    (x @ dense.T).pow(2).sum().backward()
    layer = SparseLinear(lin, idx)
    layer(x).pow(2).sum().backward()
    torch.testing.assert_close(layer.values.grad, dense.grad.reshape(-1)[idx])


def test_sampled_weight_grad_matches_einsum():
    torch.manual_seed(0)
    g, x = torch.randn(17, 5, dtype=torch.float64), torch.randn(17, 3, dtype=torch.float64)
    idx = random_indices(15, 6)
    expected = torch.einsum("to,ti->oi", g, x).reshape(-1)[idx]
    torch.testing.assert_close(sampled_weight_grad(g, x, idx), expected)


def test_frozen_weight_gets_no_grad_and_forward_uses_w_plus_s():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    lin.weight.requires_grad_(False)
    lin.bias.requires_grad_(False)
    idx = random_indices(32, 5)
    layer = SparseLinear(lin, idx, values=torch.randn(5))
    x = torch.randn(3, 8)
    expected = x @ add_entries(lin.weight, idx, layer.values).T + lin.bias
    out = layer(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert lin.weight.grad is None and lin.bias.grad is None
    assert layer.values.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_unmerge_is_bitwise_exact(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(16, 16).to(dtype)
    original = lin.weight.detach().clone()
    idx = random_indices(256, 40)
    layer = SparseLinear(lin, idx, values=torch.randn(40) * 1e-2)
    x = torch.randn(2, 16, dtype=dtype)
    unmerged_out = layer(x)
    layer.merge()
    assert not torch.equal(lin.weight, original)
    torch.testing.assert_close(layer(x), unmerged_out, rtol=0, atol=0)
    layer.unmerge()
    assert torch.equal(lin.weight.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       original.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_merge_state_errors():
    layer = SparseLinear(nn.Linear(4, 4), random_indices(16, 3))
    with pytest.raises(MergeStateError):
        layer.unmerge()
    layer.merge()
    with pytest.raises(MergeStateError):
        layer.merge()


# ---------------------------------------------------------------- the merged path: one rounding rule, all or nothing


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_values_is_stored_then_fp32_then_weight_dtype(stored, weight_dtype):
    # The model path holds fp32 values (loaded from the stored dtype); the server keeps the stored ones.
    values = (torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 1e-2).to(stored)
    weight = torch.zeros(3, dtype=weight_dtype)
    via_fp32 = values.to(torch.float32).to(weight_dtype)
    assert torch.equal(round_values(values, weight), via_fp32)
    assert torch.equal(round_values(values.to(torch.float32), weight), via_fp32)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def test_merged_entries_restore_is_bitwise_and_base_weights_leave_live_weights_alone():
    torch.manual_seed(0)
    weights = {"a": torch.randn(6, 5).to(torch.bfloat16), "b": torch.randn(4, 3).to(torch.bfloat16)}
    base = {n: w.clone() for n, w in weights.items()}
    entries = {"a": (random_indices(30, 7), torch.randn(7) * 1e-3), "b": (random_indices(12, 4, seed=1), torch.randn(4))}
    merged = MergedEntries.merge(weights, entries)
    live = {n: w.clone() for n, w in weights.items()}
    assert not torch.equal(live["b"], base["b"])
    for name, copy in merged.base_weights({**weights, "other": torch.ones(2)}).items():
        assert torch.equal(bits(copy), bits(base.get(name, torch.ones(2)))), name
        if name in weights:
            assert torch.equal(weights[name], live[name])  # the view restored copies, not the weights
    merged.restore()
    for name in weights:
        assert torch.equal(bits(weights[name]), bits(base[name])), name


def test_merged_entries_two_sets_on_one_weight_restore_exactly():
    weight = torch.randn(4, 4).to(torch.bfloat16)
    base = weight.clone()
    idx = torch.tensor([0, 5, 10])
    merged = MergedEntries.merge({"x": weight, "y": weight}, {"x": (idx, torch.full((3,), 0.3)), "y": (idx, torch.full((3,), 0.7))})
    merged.restore()
    assert torch.equal(bits(weight), bits(base))


def test_a_merge_failing_part_way_is_rolled_back():
    weights = {"a": torch.randn(3, 3), "b": torch.randn(3, 3)}
    base = {n: w.clone() for n, w in weights.items()}
    entries = {"a": (torch.tensor([0, 4]), torch.ones(2)), "b": (torch.tensor([2, 10**6]), torch.ones(2))}
    with pytest.raises((IndexError, RuntimeError)):
        MergedEntries.merge(weights, entries)
    for name in weights:
        assert torch.equal(weights[name], base[name]), name


# ---------------------------------------------------------------- the unmerged path: y = base(x) + Δ(x)


def dense_delta(indices: torch.Tensor, values: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    dense = torch.zeros(out_features * in_features, dtype=torch.float64)
    dense[indices] = values.to(torch.float64)
    return dense.view(out_features, in_features)


@pytest.mark.parametrize("shape", [(13, 7), (1, 9), (11, 1), (5, 5)])
def test_delta_matmul_matches_a_dense_float64_reference(shape):
    out_features, in_features = shape
    gen = torch.Generator().manual_seed(out_features * 31 + in_features)
    k = max(1, out_features * in_features // 3)
    # Unsorted indices, several per row and per column: the scatter must add, not overwrite.
    indices = torch.randperm(out_features * in_features, generator=gen)[:k]
    values = torch.randn(k, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 2, in_features, generator=gen, dtype=torch.float64)
    expected = x @ dense_delta(indices, values, out_features, in_features).T
    got = delta_matmul(x, indices, values, out_features, in_features)
    assert got.shape == (3, 2, out_features)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_delta_matmul_refuses_shapes_that_do_not_fit():
    x = torch.randn(2, 5)
    with pytest.raises(ShapeMismatchError, match="in_features=4"):
        delta_matmul(x, torch.tensor([0, 1]), torch.ones(2), 3, 4)
    with pytest.raises(ShapeMismatchError, match=r"values must have shape \(2,\)"):
        delta_matmul(x, torch.tensor([0, 1]), torch.ones(3), 3, 5)


def test_delta_matmul_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    values = torch.randn(9, dtype=torch.float64, requires_grad=True)
    indices = torch.randperm(35)[:9]
    assert torch.autograd.gradcheck(lambda x, v: delta_matmul(x, indices, v, 5, 7), (x, values))


class WeightOps(TorchDispatchMode):
    """Records every op that writes or copies a tensor sharing ``weight``'s storage."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.ptr, self.ops = weight.untyped_storage().data_ptr(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        touches = any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == self.ptr for a in args)
        if touches and (func._schema.is_mutable or func.__name__.split(".")[0] in ("clone", "_to_copy", "copy_")):
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def layer_pair(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(7, 11, dtype=dtype).requires_grad_(False)
    idx = random_indices(77, 19)
    values = torch.randn(19)
    return SparseLinear(lin, idx, values), SparseLinear(copy.deepcopy(lin), idx, values)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unmerged_mode_gives_the_inplace_outputs_and_gradients(dtype):
    inplace, unmerged = layer_pair(dtype)
    unmerged.set_kernels(forward_mode="unmerged")
    x = torch.randn(3, 5, 7, dtype=dtype)
    results = []
    for layer in (inplace, unmerged):
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        results.append((out.detach(), xi.grad, layer.values.grad))
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, **tol)


def test_unmerged_mode_never_writes_or_copies_the_weight():
    inplace, unmerged = layer_pair(torch.float32)
    unmerged.set_kernels(forward_mode="unmerged")
    x = torch.randn(4, 7, requires_grad=True)
    for layer, writes in ((inplace, True), (unmerged, False)):  # inplace: shows the recorder sees writes
        before = layer.weight.clone()
        with WeightOps(layer.weight) as ops:
            layer(x).sum().backward()
        assert bool(ops.ops) is writes, ops.ops
        assert torch.equal(layer.weight, before)


def test_unmerged_mode_keeps_the_base_output_dtype():
    lin = nn.Linear(8, 6).to(torch.bfloat16).requires_grad_(False)
    layer = SparseLinear(lin, random_indices(48, 9), torch.randn(9))
    layer.set_kernels(forward_mode="unmerged")
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    reference = x.double() @ (lin.weight.double() + dense_delta(layer.indices, layer.values, 6, 8)).T + lin.bias.double()
    torch.testing.assert_close(out.double(), reference, rtol=2e-2, atol=2e-2)
