"""Backward paths for the sparse values: which entries of dW = dYᵀX to compute, and how.

``sampled_weight_grad(grad_out, x, indices, backend="auto")`` is the one entry point:

- ``"auto"``: the Triton SDDMM on CUDA when triton imports, else the PyTorch path that the
  CPU cost model picks (``reference.choose_method``).
- ``"triton"``: the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``).
- ``"dense_gather"`` | ``"sddmm_columns"`` | ``"sddmm_csr"``: one PyTorch path, forced.

Example:
    >>> import torch
    >>> g, x = torch.randn(6, 3), torch.randn(6, 4)
    >>> sampled_weight_grad(g, x, torch.tensor([1, 5, 10]), backend="sddmm_columns").shape
    torch.Size([3])
"""

from __future__ import annotations

import torch

from .reference import METHODS, choose_method, dense_gather, sampled_weight_grad_torch, sddmm_columns, sddmm_csr
from .triton_sddmm import sampled_weight_grad_triton, triton_available

BACKENDS = ("auto", "triton", *METHODS)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ``backend`` means on ``device`` (``"auto"`` becomes triton or a torch method)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown sparse backward backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto" and device.type == "cuda" and triton_available():
        return "triton"
    return backend


def sampled_weight_grad(
    grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Entries ``indices`` (flat, row-major) of dW = grad_outᵀ · x, for grad_out [T, out] and x [T, in]."""
    backend = resolve_backend(backend, grad_out.device)
    if backend == "triton":
        return sampled_weight_grad_triton(grad_out, x, indices)
    return sampled_weight_grad_torch(grad_out, x, indices, method=backend)


__all__ = [
    "BACKENDS",
    "choose_method",
    "dense_gather",
    "resolve_backend",
    "sampled_weight_grad",
    "sddmm_columns",
    "sddmm_csr",
]
