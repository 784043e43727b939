"""Every backward path against the float64 reference, on odd shapes (no multiple of any block size)."""

import copy
import threading

import pytest
import torch
from torch import nn

from sparseft.delta import SparseDeltaFunction, SparseLinear, set_kernels
from sparseft.kernels import BACKENDS, choose_method, resolve_backend, sampled_weight_grad
from sparseft.kernels.reference import sddmm_columns, sddmm_csr
from sparseft.kernels.triton_sddmm import sampled_weight_grad_triton, triton_available

TORCH_METHODS = ["dense_gather", "sddmm_columns", "sddmm_csr"]


def random_indices(numel: int, k: int, seed: int = 0, sort: bool = True) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(numel, generator=gen)[:k]
    return torch.sort(idx).values if sort else idx


def reference(g: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """float64 dW = gᵀx by einsum, then the entries: the ground truth every path must match."""
    return torch.einsum("to,ti->oi", g.double(), x.double()).reshape(-1)[idx]


def odd_problem(tokens=37, n_out=13, n_in=11, k=29, dtype=torch.float32, seed=0, sort=True):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(tokens, n_out, generator=gen).to(dtype)
    x = torch.randn(tokens, n_in, generator=gen).to(dtype)
    return g, x, random_indices(n_out * n_in, k, seed, sort)


@pytest.mark.parametrize("method", TORCH_METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_paths_match_float64_reference(method, dtype):
    g, x, idx = odd_problem(dtype=dtype)
    got = sampled_weight_grad(g, x, idx, backend=method)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), reference(g, x, idx), rtol=tol, atol=tol)


@pytest.mark.parametrize("fn", [sddmm_columns, sddmm_csr])
def test_blocking_over_tokens_and_entries_changes_nothing(fn):
    g, x, idx = odd_problem(tokens=53, n_out=7, n_in=19, k=41, dtype=torch.float64)
    # 5 elements per block: tokens and entries are split into many ragged blocks.
    torch.testing.assert_close(fn(g, x, idx, block_elements=5), reference(g, x, idx), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", TORCH_METHODS)
def test_unsorted_and_edge_indices(method):
    g, x, idx = odd_problem(dtype=torch.float64, sort=False)
    torch.testing.assert_close(sampled_weight_grad(g, x, idx, backend=method), reference(g, x, idx))
    everything = torch.arange(13 * 11)
    torch.testing.assert_close(sampled_weight_grad(g, x, everything, backend=method), reference(g, x, everything))
    assert sampled_weight_grad(g, x, torch.empty(0, dtype=torch.long), backend=method).numel() == 0


def test_bf16_inputs_accumulate_in_float32():
    g, x, idx = odd_problem(tokens=301, dtype=torch.bfloat16)
    for fn in (sddmm_columns, sddmm_csr):
        got = fn(g, x, idx)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), reference(g, x, idx), rtol=1e-5, atol=1e-4)


def test_choose_method_follows_the_cost_model():
    # Very sparse: gather the few columns; dense-ish: one GEMM beats any gather.
    assert choose_method(1024, 1536, 576, k=88) == "sddmm_columns"
    assert choose_method(1024, 1536, 576, k=884_736 // 5) == "dense_gather"
    assert choose_method(1024, 8192, 2048, k=167_772) == "sddmm_csr"  # 1% of a 1B MLP weight
    assert resolve_backend("auto", torch.device("cpu")) == "auto"
    assert resolve_backend("auto", torch.device("cuda"), density=0.2) == "dense_gather"
    if triton_available():
        assert resolve_backend("auto", torch.device("cuda"), density=0.001) == "triton"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda_magic", torch.device("cpu"))


# ---------------------------------------------------------------- Triton, interpreted on CPU

def triton_runnable() -> bool:
    if not triton_available():
        return False
    if torch.cuda.is_available():
        return True
    import triton  # noqa: F401 - the import fixes interpreter mode

    return bool(triton.knobs.runtime.interpret)


needs_triton = pytest.mark.skipif(
    not triton_runnable(), reason="triton is not installed (pip install sparseft[gpu]) or cannot run here"
)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_matches_float64_reference(dtype):
    # 70 tokens and 45 entries: neither a multiple of BLOCK_T=64 nor of BLOCK_K=32.
    g, x, idx = odd_problem(tokens=70, n_out=13, n_in=11, k=45, dtype=dtype)
    got = sampled_weight_grad_triton(g, x, idx)
    assert got.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(got.double(), reference(g, x, idx), rtol=tol, atol=tol)
    unsorted = random_indices(13 * 11, 45, seed=3, sort=False)
    torch.testing.assert_close(
        sampled_weight_grad_triton(g, x, unsorted, block_k=16, block_t=16).double(),
        reference(g, x, unsorted), rtol=tol, atol=tol,
    )


@needs_triton
def test_triton_backend_inside_the_layer():
    torch.manual_seed(0)
    lin = nn.Linear(11, 13, bias=False)
    idx = random_indices(143, 29)
    layer = SparseLinear(lin, idx, values=torch.randn(29) * 0.1)
    layer.set_kernels(backend="triton")
    x = torch.randn(3, 23, 11)
    layer(x).pow(2).sum().backward()
    dense = (lin.weight.detach().double().reshape(-1).index_add(0, idx, layer.values.detach().double())).view(13, 11)
    dense.requires_grad_(True)
    (x.double() @ dense.T).pow(2).sum().backward()
    torch.testing.assert_close(layer.values.grad.double(), dense.grad.reshape(-1)[idx], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- the autograd function, every path

@pytest.mark.parametrize("backend", TORCH_METHODS)
@pytest.mark.parametrize("forward_mode", ["inplace", "copy"])
def test_gradcheck_every_path(backend, forward_mode):
    torch.manual_seed(0)
    x = torch.randn(1, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 7, dtype=torch.float64)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    idx = random_indices(77, 13)
    vals = torch.randn(13, dtype=torch.float64, requires_grad=True)
    pristine = w.clone()

    def f(x, b, vals):
        return SparseDeltaFunction.apply(x, w, b, idx, vals, backend, forward_mode)

    assert torch.autograd.gradcheck(f, (x, b, vals))
    assert torch.equal(w, pristine)


def test_inplace_and_copy_agree_bitwise_and_leave_the_weight_untouched():
    torch.manual_seed(0)
    lin = nn.Linear(19, 23).to(torch.bfloat16)
    original = lin.weight.detach().clone()
    idx = random_indices(19 * 23, 50)
    layer = SparseLinear(lin, idx, values=torch.randn(50) * 1e-2)
    x = torch.randn(4, 19, dtype=torch.bfloat16)
    outs, grads = {}, {}
    for mode in ("inplace", "copy"):
        layer.set_kernels(forward_mode=mode)
        layer.values.grad = None
        out = layer(x)
        out.float().pow(2).sum().backward()
        outs[mode], grads[mode] = out, layer.values.grad.clone()
        assert torch.equal(lin.weight.view(torch.int16), original.view(torch.int16))
    assert torch.equal(outs["inplace"], outs["copy"])
    assert torch.equal(grads["inplace"], grads["copy"])


def test_weight_is_restored_when_the_forward_fails():
    lin = nn.Linear(6, 4)
    original = lin.weight.detach().clone()
    layer = SparseLinear(lin, random_indices(24, 5), values=torch.ones(5))
    with pytest.raises(RuntimeError):
        layer(torch.randn(2, 7))  # wrong width
    assert torch.equal(lin.weight, original)


def test_concurrent_forwards_see_a_consistent_weight():
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    original = lin.weight.detach().clone()
    layer = SparseLinear(lin, random_indices(64 * 64, 400), values=torch.randn(400))
    x = torch.randn(8, 64)
    with torch.no_grad():
        expected = layer(x)
    results, errors = [], []

    def worker():
        try:
            with torch.no_grad():
                for _ in range(20):
                    results.append(torch.equal(layer(x), expected))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(results) and len(results) == 80
    assert torch.equal(lin.weight, original)


def test_layer_deepcopies_and_set_kernels_validates(tiny_model):
    from sparseft import SparseConfig, get_sparse_model

    model = get_sparse_model(tiny_model, SparseConfig(density=0.05))
    assert set_kernels(model, backend="dense_gather", forward_mode="copy") == 14
    clone = copy.deepcopy(model)
    assert all(layer.forward_mode == "copy" for layer in clone.sparse_layers().values())
    with pytest.raises(ValueError, match="backend"):
        set_kernels(model, backend="nope")
    with pytest.raises(ValueError, match="forward_mode"):
        set_kernels(model, forward_mode="nope")
    assert set(BACKENDS) >= {"auto", "triton", *TORCH_METHODS}


@pytest.mark.parametrize("backend", ["auto", "dense_gather"])
def test_training_with_inplace_forward_never_leaves_the_base_changed(tiny_model, tiny_batch, backend):
    from sparseft import SparseConfig, get_sparse_model
    from sparseft.base_match import fingerprints

    model = get_sparse_model(tiny_model, SparseConfig(density=0.05, scorer="random"))
    set_kernels(model, backend=backend, forward_mode="inplace")
    reference_model = copy.deepcopy(model)
    set_kernels(reference_model, backend="dense_gather", forward_mode="copy")
    opts = [torch.optim.AdamW(m.sparse_parameters(), lr=1e-2) for m in (model, reference_model)]
    for _ in range(3):
        losses = []
        for m, opt in zip((model, reference_model), opts):
            loss = m(**tiny_batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    weights = {name: layer.weight for name, layer in model.sparse_layers().items()}
    assert fingerprints(weights) == model.base_fingerprint
    for a, b in zip(model.sparse_parameters(), reference_model.sparse_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
