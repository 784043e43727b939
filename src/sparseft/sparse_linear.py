"""``SparseLinear``: a frozen ``nn.Linear`` whose weight entries at k fixed positions are trained.

The backward returns gradients for the k values only, so no dense gradient of the frozen weight is
stored. How the forward forms W + S (``forward_mode``), with the primitives of ``delta.py``:
- ``"inplace"`` (default): merge S into the weight's k entries, run the dense product, restore
  them, all inside the call (the backward does the same for grad_x). O(k) index work per call
  instead of an O(out·in) copy, and the weight is bitwise the base again whenever control is
  outside this function. A per-layer lock keeps threads that share the layer from seeing each
  other's half-written weight.
- ``"copy"``: build a fresh W + S per call (the first implementation; kept for comparison and for
  weights that cannot be viewed flat).
- ``"unmerged"``: ``base_layer(x) + delta_matmul(x, ...)``; the weight is only read by the base
  layer, and the values' gradient comes from autograd through the index operations.
In the first two modes the values' gradient goes through ``sparseft.kernels.sampled_weight_grad``
with ``backend``.

A layer can carry more than its trained diff: ``frozen_deltas`` holds other named diffs' entries on
this weight (never trained), and ``active`` says which diffs apply and with what weight. The forward
applies all active entry sets as one (concatenated; overlapping entries add up), ``merge`` writes them
one diff after another, and the restore takes them out in reverse, so unmerge stays exact.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import nn

from .delta import MergedEntries, add_entries, delta_matmul, entries_added
from .errors import MergeStateError
from .kernels import BACKENDS, sampled_weight_grad
from .quantize import is_quantized

FORWARD_MODES = ("inplace", "copy", "unmerged")

# The name of a layer's own, trainable diff (PEFT's name for the first adapter).
DEFAULT_DIFF = "default"


def weight_with_entries(ctx, weight, indices, values):
    """A context giving W + S for ``ctx.forward_mode``."""
    if ctx.forward_mode == "inplace":
        return entries_added(weight, indices, values, ctx.lock)
    return contextlib.nullcontext(add_entries(weight, indices, values))


class WeightLock:
    """A ``threading.Lock`` that survives ``copy.deepcopy`` and pickling (a fresh lock each time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._lock = threading.Lock()


class SparseDeltaFunction(torch.autograd.Function):
    """y = x (W + S)ᵀ + b with S given by (indices, values); gradients for x, values (and b if trainable).

    ``backend`` chooses the values' gradient kernel (see ``sparseft.kernels``), ``forward_mode``
    how W + S is formed, ``lock`` guards in-place mode against concurrent callers.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, indices, values, backend="auto", forward_mode="inplace", lock=None):  # noqa: D102
        if forward_mode == "inplace" and not weight.is_contiguous():
            forward_mode = "copy"
        ctx.save_for_backward(x, indices, values)
        # The frozen weight is kept by reference, not saved: in-place mode changes it transiently
        # (and restores it), which the saved-tensor version check would wrongly flag.
        ctx.weight, ctx.has_bias = weight, bias is not None
        ctx.backend, ctx.forward_mode, ctx.lock = backend, forward_mode, lock
        with weight_with_entries(ctx, weight, indices, values) as merged:
            return F.linear(x, merged, bias)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102 - autograd protocol
        x, indices, values = ctx.saved_tensors
        grad_x = grad_bias = grad_values = None
        if ctx.needs_input_grad[0]:
            # Formed again rather than kept, so W + S does not live from the forward to the backward.
            with weight_with_entries(ctx, ctx.weight, indices, values) as merged:
                # .to: under autocast grad_out may be bf16 while the frozen weight is fp32.
                grad_x = grad_out @ merged.to(grad_out.dtype)
        if ctx.needs_input_grad[2] and ctx.has_bias:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        if ctx.needs_input_grad[4]:
            g2d = grad_out.reshape(-1, grad_out.shape[-1])
            x2d = x.reshape(-1, x.shape[-1]).to(g2d.dtype)
            grad_values = sampled_weight_grad(g2d, x2d, indices, backend=ctx.backend).to(values.dtype)
        return grad_x, None, grad_bias, None, grad_values, None, None, None


class FrozenDelta(nn.Module):
    """Another diff's entries on one layer, applied but never trained.

    Non-persistent buffers: they follow ``.to()`` with the layer and stay out of ``state_dict``.
    """

    def __init__(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("indices", indices.to(dtype=torch.long, copy=True), persistent=False)
        self.register_buffer("values", values.detach().to(dtype=torch.float32, copy=True), persistent=False)


class SparseLinear(nn.Module):
    """Wraps a frozen ``nn.Linear``; trains ``values`` at the flat positions ``indices`` of its weight.

    ``merge()`` writes W + S into the weight and keeps the overwritten entries, so ``unmerge()``
    restores the original bit for bit (subtracting the values back would not be exact in bf16).
    """

    def __init__(self, base_layer: nn.Linear, indices: torch.Tensor, values: torch.Tensor | None = None):
        super().__init__()
        self.base_layer = base_layer
        device = base_layer.weight.device
        # A copy: re-selection changes the buffer in place, which must not reach the caller's masks.
        self.register_buffer("indices", indices.to(device=device, dtype=torch.long, copy=True), persistent=False)
        if values is None:
            values = torch.zeros(indices.numel(), dtype=torch.float32, device=device)
        if tuple(values.shape) != (indices.numel(),):
            raise ValueError(f"values must have shape ({indices.numel()},) to match the indices, got {tuple(values.shape)}")
        # With k=0 there is nothing to train and the forward skips the autograd function, so a trainable
        # `values` would never receive a gradient (DDP fails on such unused parameters): frozen instead.
        # A copy too: training changes the values in place, which must not reach the caller's tensor.
        values = values.detach().to(device=device, dtype=torch.float32, copy=True)
        self.values = nn.Parameter(values, requires_grad=indices.numel() > 0)
        self.frozen_deltas = nn.ModuleDict()  # diff name -> FrozenDelta; filled by SparseModel.load_diff
        self.active: dict[str, float] = {DEFAULT_DIFF: 1.0}  # diff name -> weight, in merge order
        self._merged_entries: MergedEntries | None = None
        self.backend = "auto"
        # A quantized weight (a tensor subclass holding codes and scales) cannot take S in place.
        self.forward_mode = "unmerged" if is_quantized(base_layer.weight) else "inplace"
        self._weight_lock = WeightLock()

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def merged(self) -> bool:
        return self._merged_entries is not None

    @property
    def k(self) -> int:
        return self.indices.numel()

    def active_entries(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{diff name: (indices, values × weight)}`` of every active diff with entries on this layer, in
        ``active`` order. The trainable values come as they are at weight 1, so autograd reaches them."""
        entries = {}
        for name, weight in self.active.items():
            if name == DEFAULT_DIFF:
                indices, values = self.indices, self.values
            elif name in self.frozen_deltas:
                indices, values = self.frozen_deltas[name].indices, self.frozen_deltas[name].values
            else:
                continue
            entries[name] = (indices, values if weight == 1.0 else values * weight)
        return entries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        entries = self.active_entries()
        if len(entries) == 1:  # the usual case: one diff, its tensors as they are
            indices, values = next(iter(entries.values()))
        else:  # one entry set for all active diffs: a single merge / gather per call, gradients split by cat
            indices = torch.cat([i for i, _ in entries.values()]) if entries else self.indices[:0]
            values = torch.cat([v for _, v in entries.values()]) if entries else self.values[:0]
        if indices.numel() == 0:
            return self.base_layer(x)
        layer = self.base_layer
        if self.forward_mode == "unmerged":
            out = layer(x)
            return out + delta_matmul(x, indices, values, layer.out_features, layer.in_features).to(out.dtype)
        return SparseDeltaFunction.apply(
            x, layer.weight, layer.bias, indices, values, self.backend, self.forward_mode, self._weight_lock
        )

    def set_kernels(self, backend: str = "auto", forward_mode: str = "inplace") -> None:
        """Choose the values' gradient kernel and how W + S is formed (see the module docstring)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if forward_mode not in FORWARD_MODES:
            raise ValueError(f"forward_mode must be one of {FORWARD_MODES}, got {forward_mode!r}")
        self.backend, self.forward_mode = backend, forward_mode

    def merge(self) -> None:
        """Write W + S into the weight (keeping the overwritten entries for ``unmerge``)."""
        if self.merged:
            raise MergeStateError("this layer is already merged; call unmerge() first")
        merge_layers({"weight": self})

    def unmerge(self) -> None:
        """Restore the original entries: the weight is bitwise the base again."""
        if not self.merged:
            raise MergeStateError("this layer is not merged; nothing to restore")
        unmerge_layers({"weight": self})

    def extra_repr(self) -> str:
        w = self.base_layer.weight
        return f"k={self.k}, density={self.k / w.numel():.4%}, merged={self.merged}"


def merge_layers(layers: dict[str, SparseLinear]) -> None:
    """Merge every active diff of every layer into its weight, one diff after another (values × weight,
    rounded by ``round_values``): all of them or, on error, none.

    Each (layer, diff) is its own entry set, so two diffs on one entry add up in the weight's dtype
    just as merging them one after the other would, and the reverse-order restore is exact. Holds
    each layer's lock meanwhile, so a thread running an in-place forward never sees a weight mid-merge.
    """
    if already := [name for name, layer in layers.items() if layer.merged]:
        raise MergeStateError(f"already merged: {already}; call unmerge() first")
    check_not_quantized(layers)
    with contextlib.ExitStack() as locks:
        for layer in layers.values():
            locks.enter_context(layer._weight_lock)
        per_layer = {name: layer.active_entries() for name, layer in layers.items()}
        merged = MergedEntries.merge(
            {(name, diff): layers[name].weight for name, entries in per_layer.items() for diff in entries},
            {(name, diff): pair for name, entries in per_layer.items() for diff, pair in entries.items()},
        )
        for name, layer in layers.items():
            layer._merged_entries = merged.only(*[(name, diff) for diff in per_layer[name]])


def check_not_quantized(layers: dict[str, SparseLinear]) -> None:
    """Refuse a merge before it starts when a weight is quantized (torchao's own error would come mid-merge)."""
    quantized = [name for name, layer in layers.items() if is_quantized(layer.weight)]
    if quantized:
        more = f", as are {len(quantized) - 1} more layers'" if len(quantized) > 1 else ""
        kind = type(layers[quantized[0]].weight).__name__
        raise MergeStateError(
            f"cannot merge into {quantized[0]}: its weight is quantized ({kind}){more}, and a delta cannot be written "
            "into its codes; over a quantized base the delta stays unmerged (the forward adds it, y = base_q(x) + Δ(x)). "
            "To merge into the dense weights the codes stand for, dequantize them first "
            "(sparseft.quantize.dequantize_base; sparseft apply --quantize does)"
        )


def unmerge_layers(layers: dict[str, SparseLinear]) -> None:
    """Restore the original entries of every merged layer in ``layers``."""
    for layer in layers.values():
        if layer._merged_entries is not None:
            with layer._weight_lock:
                layer._merged_entries.restore()
                layer._merged_entries = None


def set_kernels(model: nn.Module, backend: str = "auto", forward_mode: str = "inplace") -> int:
    """``set_kernels`` on every ``SparseLinear`` inside ``model``; returns how many layers it set.

    Example: ``set_kernels(sparse_model, backend="dense_gather", forward_mode="copy")`` gives the
    first implementation (dense dW, W + S copied per call), e.g. to benchmark against.
    """
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    for layer in layers:
        layer.set_kernels(backend, forward_mode)
    return len(layers)
