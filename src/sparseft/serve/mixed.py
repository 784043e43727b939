"""Unmerged mixed-diff forward: each row of a batch computes ``x Wᵀ + b + x S_dᵀ`` for its own diff d.

The base weights never change. Every targeted ``nn.Linear`` gets a forward hook (``MixedDeltaHook``)
that adds ``delta.mixed_delta`` of the layer's input to its output, reading which diff each batch
row uses from one shared ``RowDiffs`` that the engine sets before each forward (one engine thread
runs the model, so there is no race). A hook rather than a wrapping module: module names, the
state dict and ``find_targets`` stay those of the plain model, so diff validation, fingerprints and
merge-on-switch work on the same model unchanged.

Memory per loaded entry: a 4-byte flat position + the value in the weight's dtype, so 6 B with a
bf16 base and 8 B with an fp32 base, held once: a layer's table references the tensors the registry
loaded (``Engine.validated_entries``), which merge-on-switch uses too. The value must be in the
weight's dtype for the unmerged result to compute the same S as merging does (merge adds the value
rounded to the weight's dtype); bf16 values under an fp32 base would round S differently. Over a
quantized base nothing is merged: the values stay fp32 (8 B per entry), as ``SparseModel``'s unmerged
forward over the codes keeps them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..delta import MixedEntries, compact_indices, delta_values, mixed_delta, mixed_plan
from .registry import DiffVersion


# Plans kept per layer (the batch's and recent one-row prefills'): a plan holds one position pair and one
# value per (row, entry of its diff), so the batch's plan costs ~10-12 B x rows x k.
PLANS_KEPT = 4


class RowDiffs:
    """Which diff slot each row of the current batch uses (-1: the base); set by the engine per forward."""

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None  # None: no row has a diff, the hooks do nothing
        self.key: tuple[int, ...] = ()  # the slots as a tuple: what the hooks' cached plans are keyed by

    def set(self, slots: torch.Tensor | None) -> None:
        self.slots = slots if slots is not None and bool((slots >= 0).any()) else None
        self.key = () if self.slots is None else tuple(self.slots.tolist())


class MixedDeltaHook:
    """Forward hook on one ``nn.Linear``: output + Δ(input) for each row's diff."""

    def __init__(self, layer: nn.Linear, rows: RowDiffs):
        self.layer, self.rows = layer, rows
        self.entries = empty_entries(layer)
        # Plans by row slots: the batch's, and the one-row prefills', reused until rows or entries change.
        self._plans: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.handle = layer.register_forward_hook(self)

    def set_entries(self, entries: MixedEntries) -> None:
        self.entries, self._plans = entries, {}

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        slots = self.rows.slots
        if slots is None or self.entries.num_entries == 0:
            return output
        plan = self._plans.get(self.rows.key)
        if plan is None:
            if len(self._plans) >= PLANS_KEPT:
                self._plans.clear()
            plan = self._plans[self.rows.key] = mixed_plan(slots, self.entries)
        delta = mixed_delta(inputs[0], slots, self.entries, plan)
        return output + delta if output.dtype == torch.float32 else (output.float() + delta).to(output.dtype)

    def remove(self) -> None:
        self.handle.remove()


def empty_entries(layer: nn.Linear) -> MixedEntries:
    return MixedEntries([], layer.out_features, layer.in_features)


class MixedDiffs:
    """The diffs a model serves unmerged: one slot per diff, their entries per layer, the hooks.

    Example:
        >>> mixed = MixedDiffs(model)  # doctest: +SKIP
        >>> mixed.set_rows([support, None, legal])  # row 0 uses `support`, row 1 the base  # doctest: +SKIP
        >>> model(input_ids=ids)  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.rows = RowDiffs()
        self.hooks: dict[str, MixedDeltaHook] = {}
        self._diffs: list[DiffVersion] = []  # slot i holds self._diffs[i]

    @property
    def diffs(self) -> list[DiffVersion]:
        return list(self._diffs)

    def slot_of(self, diff: DiffVersion) -> int:
        """The slot of ``diff``, adding its entries to the layers' tables if it has none yet."""
        self.add([diff])
        return self._held_slot(diff)

    def add(self, diffs: list[DiffVersion]) -> None:
        """Give every diff of ``diffs`` that has none a slot, in order, with one rebuild of the tables."""
        new: list[DiffVersion] = []
        for diff in diffs:
            if all(diff is not held for held in (*self._diffs, *new)):
                new.append(diff)
        if new:
            self._diffs.extend(new)
            self._rebuild()

    def _held_slot(self, diff: DiffVersion) -> int:
        return next(slot for slot, held in enumerate(self._diffs) if held is diff)

    def remove(self, diffs: list[DiffVersion]) -> None:
        """Drop ``diffs`` from the tables (slots of the others are renumbered; call between batches' rows)."""
        kept = [d for d in self._diffs if all(d is not gone for gone in diffs)]
        if len(kept) != len(self._diffs):
            self._diffs = kept
            self._rebuild()

    def set_rows(self, row_diffs: list[DiffVersion | None]) -> None:
        """Tell the hooks which diff each batch row uses; diffs without a slot get one (one table rebuild for all)."""
        self.add([d for d in row_diffs if d is not None])
        slots = [-1 if d is None else self._held_slot(d) for d in row_diffs]
        device = next(self.model.parameters()).device
        self.rows.set(torch.tensor(slots, dtype=torch.long, device=device))

    def clear_rows(self) -> None:
        """Every row computes with the base weights alone (e.g. while a diff is merged)."""
        self.rows.set(None)

    def bytes_held(self) -> int:
        """Memory of the loaded entries in all layers' tables: the registry's own tensors, not a copy of them."""
        return sum(h.entries.bytes_held for h in self.hooks.values())

    def close(self) -> None:
        for hook in self.hooks.values():
            hook.remove()
        self.hooks, self._diffs = {}, []
        self.rows.set(None)

    def _rebuild(self) -> None:
        names = sorted({name for diff in self._diffs for name in diff.entries})
        for name in names:
            if name not in self.hooks:
                self.hooks[name] = MixedDeltaHook(self.model.get_submodule(name), self.rows)
        for name, hook in self.hooks.items():
            hook.set_entries(layer_table(hook.layer, [d.entries.get(name) for d in self._diffs]))


def layer_table(layer: nn.Linear, per_slot: list[tuple[torch.Tensor, torch.Tensor] | None]) -> MixedEntries:
    """One layer's ``MixedEntries`` from each slot's (flat indices, values), None where a diff skips the layer.
    Entries already in the held form (``Engine.validated_entries``: int32 positions, values by
    ``delta_values``) are referenced as they are, not copied."""
    weight = layer.weight
    held = [None if p is None else (compact_indices(p[0], weight), delta_values(p[1], weight)) for p in per_slot]
    return MixedEntries(held, layer.out_features, layer.in_features)
