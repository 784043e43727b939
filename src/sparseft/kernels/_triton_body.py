"""The Triton source of the SDDMM kernel; imported only by ``triton_sddmm.build_kernel``.

Kept apart so importing sparseft never imports triton (which fixes TRITON_INTERPRET at import),
and without ``from __future__ import annotations``: triton reads the literal ``tl.constexpr``.
"""

import triton.language as tl


def sddmm_kernel_body(
    grad_t_ptr, x_t_ptr, indices_ptr, out_ptr, k, n_in, num_tokens, grad_stride, x_stride,
    BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One program: BLOCK_K consecutive (row-sorted) entries, all tokens in BLOCK_T steps.

    Operands are feature-major (dYᵀ [out, T], Xᵀ [in, T]), so each [BLOCK_K, BLOCK_T] tile load
    reads BLOCK_K contiguous runs of tokens: coalesced along the fast axis.
    """
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    valid_k = offs_k < k
    flat = tl.load(indices_ptr + offs_k, mask=valid_k, other=0)
    rows = flat // n_in
    cols = flat - rows * n_in
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for t0 in range(0, num_tokens, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        valid = valid_k[:, None] & (offs_t[None, :] < num_tokens)
        g = tl.load(grad_t_ptr + rows[:, None] * grad_stride + offs_t[None, :], mask=valid, other=0.0)
        xv = tl.load(x_t_ptr + cols[:, None] * x_stride + offs_t[None, :], mask=valid, other=0.0)
        acc += tl.sum(g.to(tl.float32) * xv.to(tl.float32), axis=1)
    tl.store(out_ptr + offs_k, acc, mask=valid_k)
