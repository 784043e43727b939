"""Triton SDDMM for the sparse values on GPU: dval[i] = Σ_t dY[t, r_i] · X[t, c_i], nothing dense.

Layout, and why it is coalesced:
- The activations arrive token-major (dY [T, out], X [T, in]), where the T values one entry needs
  are ``out`` (or ``in``) elements apart: a warp reading them would touch one sector per value.
  We transpose both once per call to feature-major (dYᵀ [out, T], Xᵀ [in, T]); that costs
  T·(out + in) element copies, far less than the k·T reads of the product, and after it every
  entry's operands are two contiguous runs of tokens.
- Each program takes ``BLOCK_K`` consecutive entries and walks the tokens in ``BLOCK_T`` steps,
  loading a [BLOCK_K, BLOCK_T] tile from each operand: along the fast axis the lanes read
  consecutive tokens of one row, so every load is a full, coalesced transaction.
- Indices are flat and sorted (the diff format guarantees it), i.e. sorted by output row and
  then column (CSR order without a separate row-pointer array). Entries of a block therefore
  share few dYᵀ rows, and the repeated row loads are served from L1/L2: each row of dYᵀ goes
  from memory about once per block. Row/column are decoded in registers (i // in, i % in),
  so no index tensor beyond the one the layer already holds is read.
- Products are accumulated in float32 whatever the activation dtype (bf16 on GPU).
- Tiles (block-sparse dense products on tensor cores) would only pay when a tile is mostly
  selected; at 0.1-1% unstructured density nearly every 64×64 tile holds a few entries, so a
  tile kernel would redo the dense dW. The entry-parallel kernel reads k·T elements instead.

Off GPU the kernel runs under ``TRITON_INTERPRET=1`` (numpy), which is how CI checks it against
the float64 reference. Triton reads that variable when it is imported, so this module imports
triton only on the first kernel call; the kernel source itself lives in ``_triton_body.py``.
"""

import functools
import importlib.util

import torch

BLOCK_K = 32
BLOCK_T = 64


def triton_available() -> bool:
    """Whether triton is installed (without importing it: the import fixes interpreter mode)."""
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=1)
def build_kernel():
    """The jitted kernel, imported on first use.

    Triton fixes interpreter mode (TRITON_INTERPRET) when it is imported and when it decorates,
    so nothing here imports it before a kernel is actually needed.
    """
    import triton

    from ._triton_body import sddmm_kernel_body

    return triton.jit(sddmm_kernel_body)


def sampled_weight_grad_triton(
    grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, block_k: int = BLOCK_K, block_t: int = BLOCK_T
) -> torch.Tensor:
    """Entries ``indices`` (flat, row-major) of grad_outᵀ · x as float32, for grad_out [T, out], x [T, in].

    Example (on CPU, under TRITON_INTERPRET=1):
        >>> g, x = torch.randn(5, 3), torch.randn(5, 4)
        >>> sampled_weight_grad_triton(g, x, torch.tensor([0, 7, 11]))  # doctest: +SKIP
    """
    if not triton_available():
        raise ImportError("the Triton backend needs triton: pip install 'sparseft[gpu]'")
    if grad_out.shape[0] != x.shape[0]:
        raise ValueError(f"grad_out has {grad_out.shape[0]} tokens but x has {x.shape[0]}")
    k = indices.numel()
    out = torch.empty(k, dtype=torch.float32, device=grad_out.device)
    if k == 0:
        return out
    grad_t = grad_out.transpose(0, 1).contiguous()
    x_t = x.transpose(0, 1).contiguous()
    kernel = build_kernel()
    kernel[(-(-k // block_k),)](
        grad_t, x_t, indices.contiguous(), out, k, x.shape[1], grad_out.shape[0],
        grad_t.stride(0), x_t.stride(0), BLOCK_K=block_k, BLOCK_T=block_t,
    )
    return out
