"""Pure-PyTorch gradient of the sparse values; runs everywhere and is the reference for faster kernels."""

from __future__ import annotations

import torch


def sampled_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Entries ``indices`` (flat, row-major) of dW = grad_outᵀ · x, for grad_out [T, out] and x [T, in].

    This path forms the dense dW transiently and gathers k entries from it: the same compute as
    full fine-tuning, but nothing dense outlives the call.
    """
    dense = grad_out.transpose(0, 1) @ x
    return dense.reshape(-1).index_select(0, indices)
