"""The sparse delta on one frozen weight: k trainable values at fixed flat positions.

The forward computes with W + S; the backward returns gradients for the k values only, so no dense
gradient of the frozen weight is ever stored and the optimizer holds state for k numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MergeStateError
from .kernels import sampled_weight_grad


def add_entries(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A new tensor W + S (rounded to W's dtype); ``weight`` itself is left untouched."""
    flat = weight.detach().reshape(-1).clone()
    flat.index_add_(0, indices, values.detach().to(weight.dtype))
    return flat.view_as(weight)


class SparseDeltaFunction(torch.autograd.Function):
    """y = x (W + S)ᵀ + b with S given by (indices, values); gradients for x, values (and b if trainable)."""

    @staticmethod
    def forward(ctx, x, weight, bias, indices, values):  # noqa: D102 - autograd protocol
        ctx.save_for_backward(x, weight, indices, values)
        ctx.has_bias = bias is not None
        return F.linear(x, add_entries(weight, indices, values), bias)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102 - autograd protocol
        x, weight, indices, values = ctx.saved_tensors
        grad_x = grad_bias = grad_values = None
        if ctx.needs_input_grad[0]:
            # Rebuilt rather than saved, so W + S does not live from the forward to the backward.
            # Under autocast grad_out is bf16/fp16 while the weight stays fp32: compute in grad_out's dtype.
            grad_x = grad_out @ add_entries(weight, indices, values).to(grad_out.dtype)
        if ctx.needs_input_grad[2] and ctx.has_bias:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        if ctx.needs_input_grad[4]:
            g2d = grad_out.reshape(-1, grad_out.shape[-1])
            x2d = x.reshape(-1, x.shape[-1]).to(g2d.dtype)
            grad_values = sampled_weight_grad(g2d, x2d, indices).to(values.dtype)
        return grad_x, None, grad_bias, None, grad_values


class SparseLinear(nn.Module):
    """Wraps a frozen ``nn.Linear``; trains ``values`` at the flat positions ``indices`` of its weight.

    ``merge()`` writes W + S into the weight and keeps the overwritten entries, so ``unmerge()``
    restores the original bit for bit (subtracting the values back would not be exact in bf16).
    """

    def __init__(self, base_layer: nn.Linear, indices: torch.Tensor, values: torch.Tensor | None = None):
        super().__init__()
        self.base_layer = base_layer
        device = base_layer.weight.device
        self.register_buffer("indices", indices.to(device=device, dtype=torch.long), persistent=False)
        if values is None:
            values = torch.zeros(indices.numel(), dtype=torch.float32, device=device)
        self.values = nn.Parameter(values.to(device=device, dtype=torch.float32))
        self._original_entries: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def merged(self) -> bool:
        return self._original_entries is not None

    @property
    def k(self) -> int:
        return self.indices.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.k == 0:
            return self.base_layer(x)
        return SparseDeltaFunction.apply(x, self.base_layer.weight, self.base_layer.bias, self.indices, self.values)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise MergeStateError("this layer is already merged; call unmerge() first")
        flat = self.base_layer.weight.data.view(-1)
        self._original_entries = flat.index_select(0, self.indices).clone()
        flat.index_add_(0, self.indices, self.values.detach().to(flat.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise MergeStateError("this layer is not merged; nothing to restore")
        self.base_layer.weight.data.view(-1).index_copy_(0, self.indices, self._original_entries)
        self._original_entries = None

    def extra_repr(self) -> str:
        w = self.base_layer.weight
        return f"k={self.k}, density={self.k / w.numel():.4%}, merged={self.merged}"
