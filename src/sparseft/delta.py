"""The sparse delta S on frozen weights: k values at fixed flat positions, applied two ways.

**Merged** (the weight holds W + S): ``MergedEntries`` writes entries into a set of weights, keeps
the overwritten originals and restores them bit for bit; a merge that fails part-way is rolled
back, so no weight is ever left half-merged. ``round_values`` is the one rule for how values enter
a weight. Everything that merges uses these: ``SparseLinear``'s in-place forward, ``merge()`` of a
layer or a whole ``SparseModel``, and the serving engine's switch between diffs.

**Unmerged** (the weight is never written): ``delta_matmul`` computes Δ(x) = x Sᵀ from (indices,
values) alone, so ``y = base_layer(x) + Δ(x)`` works where the weight cannot be written or is not
whole on this device (mixed-diff batches, a quantized base, FSDP-sharded weights).

``SparseLinear`` trains the values; the backward returns gradients for the k values only, so no
dense gradient of the frozen weight is stored. How its forward forms W + S (``forward_mode``):
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
from typing import Hashable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MergeStateError, ShapeMismatchError
from .kernels import BACKENDS, sampled_weight_grad

FORWARD_MODES = ("inplace", "copy", "unmerged")

# weight name -> (flat indices, values): what MergedEntries writes (the serving registry holds these).
Entries = dict[str, tuple[torch.Tensor, torch.Tensor]]

# The name of a layer's own, trainable diff (PEFT's name for the first adapter).
DEFAULT_DIFF = "default"


# ------------------------------------------------------------------ merged: W + S written into the weight


def round_values(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``values`` as they are added into ``weight``: on its device, rounded once to its dtype.

    The one rounding rule of every merge. Diff files store bf16, fp16 or fp32 values, all of which
    widen to fp32 exactly, so rounding straight to the weight's dtype gives the same bits as
    stored dtype → fp32 (what ``SparseModel`` holds and trains) → weight dtype. That is why a model
    that loaded a diff and a server that kept the stored values write identical weights.

    Example:
        >>> round_values(torch.tensor([0.1]), torch.zeros(2, dtype=torch.bfloat16)).dtype
        torch.bfloat16
    """
    return values.detach().to(device=weight.device, dtype=weight.dtype)


def add_entries(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A new tensor W + S (values rounded by ``round_values``); ``weight`` itself is left untouched."""
    flat = weight.detach().reshape(-1).clone()
    flat.index_add_(0, indices, round_values(values, weight))
    return flat.view_as(weight)


def merge_entries(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Write W + S into ``weight`` in place; returns the overwritten original entries for ``restore_entries``.

    Keeping the originals (rather than subtracting ``values`` later) is what makes the revert exact in
    every dtype. Works on ``weight.data``, so autograd never sees it and no ``no_grad`` context (whose
    enter/exit costs more than the scatter on small modules) is needed per call.
    """
    flat = weight.data.view(-1)
    original = flat.index_select(0, indices)  # a copy, not a view
    flat.index_add_(0, indices, round_values(values, flat))
    return original


def restore_entries(weight: torch.Tensor, indices: torch.Tensor, original: torch.Tensor) -> None:
    """Put back the entries ``merge_entries`` returned: ``weight`` is bitwise what it was before."""
    weight.data.view(-1).index_copy_(0, indices, original)


class MergedEntries:
    """Entries merged into a set of weights, with what it takes to restore them exactly.

    Example:
        >>> w = {"q": torch.zeros(2, 3)}
        >>> merged = MergedEntries.merge(w, {"q": (torch.tensor([1, 4]), torch.tensor([1.0, 2.0]))})
        >>> w["q"].tolist()
        [[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]]
        >>> merged.restore(); w["q"].abs().sum().item()
        0.0
    """

    def __init__(self, weights: dict, indices: dict, originals: dict) -> None:
        # Use MergedEntries.merge; this only holds its result (name -> weight, indices, saved entries).
        self.weights, self.indices, self.originals = weights, indices, originals

    @classmethod
    def merge(
        cls, weights: dict[Hashable, torch.Tensor], entries: dict[Hashable, tuple[torch.Tensor, torch.Tensor]]
    ) -> "MergedEntries":
        """Write each entry set of ``entries`` into ``weights[name]``: all of them, or (on any error,
        which is re-raised) none, the weights merged so far restored first."""
        merged = cls({}, {}, {})
        try:
            for name, (indices, values) in entries.items():
                weight = weights[name]
                merged.originals[name] = merge_entries(weight, indices, values)
                merged.weights[name], merged.indices[name] = weight, indices
        except BaseException:
            merged.restore()  # never leave a half-merged set
            raise
        return merged

    def restore(self) -> None:
        """Put every saved entry back: the weights are bitwise what they were before ``merge``.
        In reverse order, so two entry sets on one weight also come out exact."""
        for name in reversed(list(self.originals)):
            restore_entries(self.weights[name], self.indices[name], self.originals[name])
        self.weights, self.indices, self.originals = {}, {}, {}

    def only(self, *names: Hashable) -> "MergedEntries":
        """The part of this merge that concerns the entry sets ``names`` (restoring it restores those only,
        in reverse merge order)."""
        wanted = set(names)
        kept = [name for name in self.originals if name in wanted]
        return MergedEntries(
            {n: self.weights[n] for n in kept}, {n: self.indices[n] for n in kept}, {n: self.originals[n] for n in kept}
        )

    def base_weights(self, weights: dict[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """``weights`` as they were before the merge: merged ones are replaced by restored copies;
        the live weights are not touched (e.g. to fingerprint the base while a diff is merged)."""
        view = dict(weights)
        for name, original in self.originals.items():
            if name in view:
                copy = view[name].detach().clone()
                restore_entries(copy, self.indices[name], original)
                view[name] = copy
        return view


@contextlib.contextmanager
def entries_added(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, lock=None):
    """Within the block ``weight`` holds W + S (same rounding as ``add_entries``); after it, W exactly.

    Writes go through ``.data`` so autograd's version counter is not bumped: the change is
    undone bit for bit before anything else can observe it.
    """
    with lock if lock is not None else contextlib.nullcontext():
        originals = merge_entries(weight, indices, values)
        try:
            yield weight.data
        finally:
            restore_entries(weight, indices, originals)


# ------------------------------------------------------------------ unmerged: y = base(x) + Δ(x)


def gather_scale_scatter(
    x2d: torch.Tensor, src: torch.Tensor, values: torch.Tensor, dst: torch.Tensor, size: int
) -> torch.Tensor:
    """``out[t, dst[e]] += x2d[t, src[e]] * values[e]`` for every token t and entry e; out is (tokens, size).

    The one kernel of the unmerged delta (``delta_matmul`` for one diff, ``mixed_delta`` for a batch
    mixing diffs): each sparse entry reads one input feature, scales it and adds it into one output
    feature, for all tokens at once. O(tokens·k) memory and work, no dense S. Computed in fp32 (fp64
    when an input is fp64); autograd reaches ``values`` and ``x2d`` (the scatter goes into a fresh tensor).
    """
    dtype = torch.promote_types(torch.promote_types(x2d.dtype, values.dtype), torch.float32)
    values = values.to(dtype)
    if x2d.shape[0] == 1:  # one token (decoding): 1-D ops with int32 positions are the fastest on CPU
        gathered = x2d[0].index_select(0, src).to(dtype) * values
        return gathered.new_zeros(size).index_add_(0, dst, gathered).unsqueeze(0)
    # Several tokens: index along dim 1 with int64 positions (CPU's multi-dim index_add_ is much slower with
    # int32 ones; the measurement is in docs/serving.md, "The unmerged mixed-diff forward").
    src, dst = src.long(), dst.long()
    gathered = x2d.index_select(1, src).to(dtype) * values
    return gathered.new_zeros(x2d.shape[0], size).index_add_(1, dst, gathered)


def delta_matmul(
    x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, out_features: int, in_features: int
) -> torch.Tensor:
    """Δ(x) = x Sᵀ for the (out_features × in_features) delta S given by flat ``indices`` and ``values``.

    Reads neither the weight nor a dense S: x's columns are gathered per entry, multiplied by the
    values and added into the output rows. Computed in the promoted dtype of ``x`` and ``values``
    (fp32 for bf16 activations and values; fp64 if either is fp64). ``indices`` must be in range (a validated diff's are).

    Example:
        >>> x = torch.ones(1, 3)
        >>> delta_matmul(x, torch.tensor([1, 5]), torch.tensor([2.0, 3.0]), 2, 3)
        tensor([[2., 3.]])
    """
    if x.shape[-1] != in_features:
        raise ShapeMismatchError(f"x has {x.shape[-1]} features in its last dimension, expected in_features={in_features}")
    if tuple(values.shape) != (indices.numel(),):
        raise ShapeMismatchError(f"values must have shape ({indices.numel()},) to match the indices, got {tuple(values.shape)}")
    x2d = x.reshape(-1, in_features)
    rows, cols = indices // in_features, indices % in_features
    out = gather_scale_scatter(x2d, cols, values, rows, out_features)
    return out.reshape(*x.shape[:-1], out_features)


# ------------------------------------------------------------------ the trainable layer

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
        self.forward_mode = "unmerged" if hasattr(type(base_layer.weight), "__tensor_flatten__") else "inplace"
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


# ---------------------------------------------------------------- unmerged: many diffs in one batch (same core as delta_matmul)


class MixedEntries:
    """The entries of several diffs on one ``out_features x in_features`` weight, stored compactly.

    Entries are sorted by diff slot: slot ``s`` owns ``flat[offsets[s]:offsets[s + 1]]`` (flat
    positions ``row * in_features + col``, int32) and the same range of ``values``. Per entry that is
    4 B of index + 2 B (bf16) or 4 B (fp32) of value; the slot costs nothing per entry (``offsets``
    is one int64 per diff).
    """

    def __init__(self, flat: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, out_features: int,
                 in_features: int) -> None:
        self.flat = flat  # (E,) int32 (int64 for weights of 2**31 entries or more)
        self.values = values  # (E,)
        self.offsets = offsets  # (slots + 1,) int64
        self.out_features, self.in_features = out_features, in_features

    @property
    def bytes_per_entry(self) -> int:
        return self.flat.element_size() + self.values.element_size()


def mixed_pairs(row_diff: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each batch row, the entry range of its diff: (row of each pair, entry of each pair).

    ``row_diff[b]`` is the slot of row b's diff, -1 for none. Rows of the same diff each get all of
    its entries; a batch with rows b1, b2 of diff 3 and b3 of none yields pairs (b1, e), (b2, e) for
    every entry e of slot 3. No Python loop over diffs: counts, repeat_interleave and an arange.
    """
    has_diff = row_diff >= 0
    slot = row_diff.clamp(min=0)
    starts = offsets[slot]
    counts = torch.where(has_diff, offsets[slot + 1] - starts, torch.zeros_like(starts))
    rows = torch.repeat_interleave(torch.arange(row_diff.numel(), device=row_diff.device), counts)
    first_pair = torch.cumsum(counts, 0) - counts  # where each row's pairs begin
    entry = torch.arange(rows.numel(), device=row_diff.device) - (first_pair - starts).repeat_interleave(counts)
    return rows, entry


def mixed_plan(row_diff: torch.Tensor, entries: MixedEntries) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``mixed_delta`` gathers, scales and scatters for these rows: (src, values, dst) per pair.

    Depends only on which diff each row uses, so a caller decoding step after step with the same
    rows computes it once (``MixedDeltaHook`` does).
    """
    rows, entry = mixed_pairs(row_diff, entries.offsets)
    flat = entries.flat.index_select(0, entry).long()
    src = rows * entries.in_features + flat % entries.in_features
    dst = rows * entries.out_features + flat // entries.in_features
    # int32 positions when they fit: a kept plan costs 8 B + one value per pair instead of 16 B + one value.
    fits = row_diff.numel() * max(entries.in_features, entries.out_features) < 2**31
    index_dtype = torch.int32 if fits else torch.long
    return src.to(index_dtype), entries.values.index_select(0, entry), dst.to(index_dtype)


def mixed_delta(
    x: torch.Tensor, row_diff: torch.Tensor, entries: MixedEntries,
    plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Δ(x) for a batch whose rows use different diffs: row b gets ``x[b] S_{row_diff[b]}ᵀ`` (fp32).

    ``x`` is (B, ..., in_features), ``row_diff`` (B,) diff slots (-1: none, Δ = 0). One gather,
    multiply and ``index_add_`` over the entries of all diffs present, whatever their number.
    ``plan`` is ``mixed_plan(row_diff, entries)`` when the caller reuses it across steps.

    Example:
        >>> w = MixedEntries(torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1.0, 2.0]),
        ...                  torch.tensor([0, 1, 2]), out_features=2, in_features=2)
        >>> mixed_delta(torch.ones(3, 2), torch.tensor([0, 1, -1]), w)  # slot 0 adds W[0,1]=1, slot 1 W[1,0]=2
        tensor([[1., 0.],
                [0., 2.],
                [0., 0.]])
    """
    batch, inner = x.shape[0], x.shape[1:-1]
    src, values, dst = plan if plan is not None else mixed_plan(row_diff, entries)
    # Token positions first, rows' features side by side: row b's feature j is column b * in_features + j.
    x2d = x.reshape(batch, -1, entries.in_features).transpose(0, 1).reshape(-1, batch * entries.in_features)
    delta = gather_scale_scatter(x2d, src, values, dst, batch * entries.out_features)
    return delta.view(-1, batch, entries.out_features).transpose(0, 1).reshape(batch, *inner, entries.out_features)
