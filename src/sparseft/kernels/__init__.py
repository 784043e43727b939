"""Backward paths for the sparse values: which entries of dW = dYᵀX to compute, and how.

``sampled_weight_grad(grad_out, x, indices, backend="auto")`` is the one entry point:

- ``"auto"``: on CUDA, the Triton SDDMM up to ``GPU_SDDMM_MAX_DENSITY`` and the dense GEMM
  above it; elsewhere (or without triton) the PyTorch path that the CPU cost model picks
  (``reference.choose_method``).
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

# A roofline estimate, not a measurement (docs/kernels.md, "Where it should win"): an SDDMM entry reads
# ~T activations from memory while a dense dW element costs 2T FLOP, so the kernel wins at low density.
# 1% is included so the step benchmark exercises the kernel at both of its densities; tune it from
# the crossover that ``python -m sparseft.bench.sddmm_gpu`` prints on the GPU.
GPU_SDDMM_MAX_DENSITY = 0.01


def resolve_backend(backend: str, device: torch.device, density: float = 0.0) -> str:
    """The backend ``backend`` means on ``device`` at ``density`` (k / out·in): ``"auto"`` may become
    ``"triton"`` or ``"dense_gather"`` on CUDA, and stays ``"auto"`` (the CPU cost model) elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown sparse backward backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto" and device.type == "cuda":
        if density > GPU_SDDMM_MAX_DENSITY:
            return "dense_gather"
        if triton_available():
            return "triton"
    return backend


def sampled_weight_grad(
    grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Entries ``indices`` (flat, row-major) of dW = grad_outᵀ · x, for grad_out [T, out] and x [T, in]."""
    density = indices.numel() / max(1, grad_out.shape[1] * x.shape[1])
    backend = resolve_backend(backend, grad_out.device, density)
    if backend == "triton":
        return sampled_weight_grad_triton(grad_out, x, indices)
    return sampled_weight_grad_torch(grad_out, x, indices, backend=backend)


__all__ = [
    "BACKENDS",
    "GPU_SDDMM_MAX_DENSITY",
    "choose_method",
    "dense_gather",
    "resolve_backend",
    "sampled_weight_grad",
    "sddmm_columns",
    "sddmm_csr",
]
