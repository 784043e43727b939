"""The sparse delta S on frozen weights: k values at fixed flat positions, applied two ways.

**Merged** (the weight holds W + S): ``MergedEntries`` writes entries into a set of weights, keeps
the overwritten originals and restores them bit for bit; a merge that fails part-way is rolled
back, so no weight is ever left half-merged. ``round_values`` is the one rule for how values enter
a weight. Everything that merges uses these: ``SparseLinear``'s in-place forward, ``merge()`` of a
layer or a whole ``SparseModel``, and the serving engine's switch between diffs.

**Unmerged** (the weight is never written): ``delta_matmul`` computes Δ(x) = x Sᵀ from (indices,
values) alone, so ``y = base_layer(x) + Δ(x)`` works where the weight cannot be written or is not
whole on this device (mixed-diff batches, a quantized base, FSDP-sharded weights). ``mixed_delta``
is the same computation for a batch whose rows use different diffs (``MixedEntries``), which the
serving engine's per-row hooks (``serve/mixed.py``) call.

The trainable layer built on these primitives (``SparseLinear``, its autograd function, named frozen
diffs on a layer) lives in ``sparse_linear.py``; its public names are re-exported here, so
``from sparseft.delta import SparseLinear`` keeps working.
"""

from __future__ import annotations

import contextlib
from typing import Hashable

import torch

from .errors import ShapeMismatchError
from .quantize import is_quantized

# weight name -> (flat indices, values): what MergedEntries writes (the serving registry holds these).
Entries = dict[str, tuple[torch.Tensor, torch.Tensor]]

# Names that moved to ``sparse_linear.py``, still importable from here. Resolved on first use
# (PEP 562) because ``sparse_linear`` imports this module's primitives.
MOVED_TO_SPARSE_LINEAR = (
    "DEFAULT_DIFF", "FORWARD_MODES", "FrozenDelta", "SparseDeltaFunction", "SparseLinear", "WeightLock",
    "merge_layers", "set_kernels", "unmerge_layers", "weight_with_entries",
)


def __getattr__(name: str):
    if name in MOVED_TO_SPARSE_LINEAR:
        from . import sparse_linear

        return getattr(sparse_linear, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def delta_values(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``values`` as a server holds them for ``weight``, merged or unmerged alike: rounded by ``round_values``
    (so adding them unmerged computes the S a merge writes), except over a quantized weight, which no entry
    is ever merged into: there they stay fp32, as ``SparseModel``'s unmerged forward over the codes keeps them.

    Example:
        >>> delta_values(torch.tensor([0.1]), torch.zeros(2, dtype=torch.bfloat16)).dtype
        torch.bfloat16
    """
    if is_quantized(weight):
        return values.detach().to(device=weight.device, dtype=torch.float32)
    return round_values(values, weight)


def compact_indices(indices: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Flat positions into ``weight`` on its device, int32 when every position fits (half of int64's bytes);
    ``merge_entries`` and the unmerged paths take either."""
    dtype = torch.int32 if weight.numel() < 2**31 else torch.long
    return indices.to(device=weight.device, dtype=dtype)


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
    weight.data.view(-1).index_copy_(0, indices.long(), original)  # index_copy_ takes int64 positions only


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


# ---------------------------------------------------------------- unmerged: many diffs in one batch (same core as delta_matmul)


class MixedEntries:
    """The entries of several diffs on one ``out_features x in_features`` weight, one (flat, values) pair per
    diff slot (None where that diff skips the weight).

    ``flat`` holds positions ``row * in_features + col`` (int32 below 2**31 entries, ``compact_indices``),
    ``values`` the values in the weight's dtype. The pairs are referenced, not copied: the server's table
    for a layer holds the very tensors its registry loaded, so a loaded entry costs 4 B of index + 2 B (bf16)
    or 4 B (fp32) of value once, whatever else uses it.
    """

    def __init__(self, per_slot: list[tuple[torch.Tensor, torch.Tensor] | None], out_features: int,
                 in_features: int) -> None:
        self.per_slot = per_slot  # slot s -> (flat (k_s,), values (k_s,)) or None
        self.out_features, self.in_features = out_features, in_features
        # Counted once: the serving hook reads it on every forward of every targeted layer.
        self.num_entries = sum(pair[0].numel() for pair in per_slot if pair is not None)

    @property
    def bytes_held(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.per_slot if pair is not None for t in pair)

    def present(self, row_diff: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """(each row's place in the list that follows, -1 for the base or a diff without entries on this
        weight; the (flat, values) of the slots ``row_diff`` uses that have entries here, in slot order)."""
        slots = row_diff.tolist()
        wanted = sorted({s for s in slots if s >= 0 and self.per_slot[s] is not None})
        place = {slot: i for i, slot in enumerate(wanted)}
        row_local = torch.tensor([place.get(s, -1) for s in slots], dtype=torch.long, device=row_diff.device)
        return row_local, [self.per_slot[s] for s in wanted]


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
    row_local, pairs = entries.present(row_diff)
    device = row_diff.device
    if not pairs:  # no row's diff has entries on this weight
        nothing = torch.zeros(0, dtype=torch.int32, device=device)
        return nothing, torch.zeros(0, device=device), nothing
    # The present diffs' entries side by side: a transient copy, no larger than the plan built from it.
    flat_all, values_all = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    offsets = torch.tensor([0, *(p[0].numel() for p in pairs)], device=device).cumsum(0)
    rows, entry = mixed_pairs(row_local, offsets)
    flat = flat_all.index_select(0, entry).long()
    src = rows * entries.in_features + flat % entries.in_features
    dst = rows * entries.out_features + flat // entries.in_features
    # int32 positions when they fit: a kept plan costs 8 B + one value per pair instead of 16 B + one value.
    fits = row_diff.numel() * max(entries.in_features, entries.out_features) < 2**31
    index_dtype = torch.int32 if fits else torch.long
    return src.to(index_dtype), values_all.index_select(0, entry), dst.to(index_dtype)


def mixed_delta(
    x: torch.Tensor, row_diff: torch.Tensor, entries: MixedEntries,
    plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Δ(x) for a batch whose rows use different diffs: row b gets ``x[b] S_{row_diff[b]}ᵀ`` (fp32).

    ``x`` is (B, ..., in_features), ``row_diff`` (B,) diff slots (-1: none, Δ = 0). One gather,
    multiply and ``index_add_`` over the entries of all diffs present, whatever their number.
    ``plan`` is ``mixed_plan(row_diff, entries)`` when the caller reuses it across steps.

    Example:
        >>> one = lambda position, value: (torch.tensor([position], dtype=torch.int32), torch.tensor([value]))
        >>> w = MixedEntries([one(1, 1.0), one(2, 2.0)], out_features=2, in_features=2)
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
