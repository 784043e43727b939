import pytest
import torch
from torch import nn

from sparseft.delta import SparseDeltaFunction, SparseLinear, add_entries
from sparseft.errors import MergeStateError
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
