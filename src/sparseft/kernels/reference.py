"""Pure-PyTorch gradients of the sparse values: dval[i] = Σ_t dY[t, r_i] · X[t, c_i].

Three ways to compute the same k numbers, for grad_out dY [T, out], x X [T, in] and flat
row-major ``indices`` (i = r · in + c):

- ``dense_gather``: form dW = dYᵀX (one GEMM, T·out·in multiply-adds) and gather k entries.
  What SpIEL and PEFT's SHiRA do; the fastest on CPU once the density is high, because a
  BLAS GEMM runs near peak while gathers are memory-bound.
- ``sddmm_columns``: gather the k needed columns of dY and X and multiply them pairwise
  (T·k work, no transposes); the fastest at very low density.
- ``sddmm_csr``: ``torch.sparse.sampled_addmm`` with the indices as a CSR matrix (rows sorted,
  so each output row of dYᵀ is read once per row and dotted with the X columns it needs);
  costs two transposes (T·(out + in)) plus T·k contiguous dot products: the middle ground.

The two SDDMM paths loop over blocks of tokens (``sddmm_columns`` also over blocks of entries)
so their transient memory stays bounded by ``block_elements`` whatever the batch, and accumulate
in float32 (float64 inputs stay float64, which is what the tests compare against).
``choose_method`` picks one by a cost model whose constants were measured on the CPU dev
machine (see docs/benchmarks/cpu_step.md); ``sampled_weight_grad`` applies it.
"""

from __future__ import annotations

import warnings

import torch

# sampled_addmm works on a CSR pattern; torch warns once that CSR is "beta", which says nothing
# about this use (the tests compare it with a float64 reference).
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)

# Transient elements per block (16 MiB of float32): bounds the memory of every path.
BLOCK_ELEMENTS = 1 << 22

# Cost model, seconds per unit of work (one thread, CPU time): a GEMM multiply-add, a gathered column
# element of both operands, a transposed element, a CSR dot-product element. Machine-dependent: how
# they were measured (``python -m sparseft.bench.backward_cpu``) is in docs/kernels.md, "The CPU cost model".
GEMM_S = 19e-12
COLUMN_GATHER_S = 2.6e-9
TRANSPOSE_S = 3.2e-9
CSR_DOT_S = 0.45e-9

METHODS = ("dense_gather", "sddmm_columns", "sddmm_csr")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_blocks(num_tokens: int, width: int, block_elements: int = BLOCK_ELEMENTS):
    """Slices of at most ``block_elements // width`` tokens (at least one) covering [0, T)."""
    step = max(1, block_elements // max(1, width))
    for start in range(0, num_tokens, step):
        yield slice(start, min(num_tokens, start + step))


def dense_gather(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Entries ``indices`` of the dense dW = grad_outᵀ · x: the compute of full fine-tuning.

    Kept exactly as the first implementation (GEMM in the inputs' dtype, dW transient for the
    call) so benchmarks can compare the old path with the new ones.
    """
    return (grad_out.transpose(0, 1) @ x).reshape(-1).index_select(0, indices)


def sddmm_columns(
    grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, block_elements: int = BLOCK_ELEMENTS
) -> torch.Tensor:
    """Only the k entries: gather the needed columns of grad_out and x and dot them pairwise."""
    acc = accumulation_dtype(grad_out.dtype)
    rows, cols = indices // x.shape[1], indices % x.shape[1]
    out = torch.zeros(indices.numel(), dtype=acc, device=grad_out.device)
    num_tokens = grad_out.shape[0]
    entries_per_block = max(1, block_elements // max(1, min(num_tokens, block_elements)))
    for start in range(0, indices.numel(), entries_per_block):
        entries = slice(start, start + entries_per_block)
        for tokens in token_blocks(num_tokens, 1, block_elements):
            g = grad_out[tokens].index_select(1, rows[entries]).to(acc)
            g.mul_(x[tokens].index_select(1, cols[entries]).to(acc))
            out[entries] += g.sum(0)
    return out


def sddmm_csr(
    grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, block_elements: int = BLOCK_ELEMENTS
) -> torch.Tensor:
    """Only the k entries, through ``torch.sparse.sampled_addmm`` on a CSR pattern of ``indices``.

    sampled_addmm needs rows in order, so unsorted indices are sorted here and the result is
    put back in the caller's order.
    """
    acc = accumulation_dtype(grad_out.dtype)
    n_out, n_in = grad_out.shape[1], x.shape[1]
    order = None
    if indices.numel() > 1 and bool((indices[1:] < indices[:-1]).any()):
        indices, order = torch.sort(indices)
    rows, cols = indices // n_in, indices % n_in
    crow = torch.zeros(n_out + 1, dtype=torch.long, device=indices.device)
    crow[1:] = torch.bincount(rows, minlength=n_out).cumsum(0)
    pattern = torch.sparse_csr_tensor(
        crow, cols, torch.zeros(indices.numel(), dtype=acc, device=indices.device),
        size=(n_out, n_in), check_invariants=False,
    )
    sampled = torch.zeros(indices.numel(), dtype=acc, device=grad_out.device)
    for tokens in token_blocks(grad_out.shape[0], n_out + n_in, block_elements):
        g, xb = grad_out[tokens].to(acc), x[tokens].to(acc)
        sampled += torch.sparse.sampled_addmm(pattern, g.transpose(0, 1), xb, beta=0.0).values()
    if order is None:
        return sampled
    return torch.empty_like(sampled).index_copy_(0, order, sampled)


def estimated_seconds(backend: str, num_tokens: int, n_out: int, n_in: int, k: int) -> float:
    """The cost model behind ``choose_method`` (CPU, one thread)."""
    if backend == "dense_gather":
        return GEMM_S * num_tokens * n_out * n_in
    if backend == "sddmm_columns":
        return COLUMN_GATHER_S * num_tokens * k
    if backend == "sddmm_csr":
        return TRANSPOSE_S * num_tokens * (n_out + n_in) + CSR_DOT_S * num_tokens * k
    raise ValueError(f"unknown backend {backend!r}; choose one of {METHODS}")


def choose_method(num_tokens: int, n_out: int, n_in: int, k: int) -> str:
    """The CPU method with the lowest modelled cost for this shape and number of entries.

    On the dev machine this gives sddmm_columns below ~0.5% density at SmolLM2 shapes,
    sddmm_csr up to a few percent, and dense_gather above.
    """
    return min(METHODS, key=lambda m: estimated_seconds(m, num_tokens, n_out, n_in, k))


def sampled_weight_grad_torch(
    grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Entries ``indices`` (flat, row-major) of dW = grad_outᵀ · x, for grad_out [T, out] and x [T, in]."""
    if backend == "auto":
        backend = choose_method(grad_out.shape[0], grad_out.shape[1], x.shape[1], indices.numel())
    if backend == "dense_gather":
        return dense_gather(grad_out, x, indices)
    if backend == "sddmm_columns":
        return sddmm_columns(grad_out, x, indices)
    if backend == "sddmm_csr":
        return sddmm_csr(grad_out, x, indices)
    raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {METHODS}")
