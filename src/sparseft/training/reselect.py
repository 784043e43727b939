"""Dynamic re-selection: every ``reselect_every`` steps, swap some trained entries for better ones.

Per targeted module, with its k fixed:

- drop the m entries whose current value has the smallest |value| (they moved the least);
- grow the m entries outside the current mask with the largest |∂loss/∂W|, the dense weight
  gradient of the summed loss of one or more micro-batches (summed over processes too). With one
  micro-batch (the default) it is computed one module at a time inside the backward pass and
  reduced at once to the module's m best candidates, so no dense gradient outlives its module's
  hook. With N > 1 each module's gradient is summed into one fp32 buffer over the N backward
  passes (one buffer per module whatever N is, freed once ranked): the less noisy criterion costs
  N forward + backward passes and, while they run, a buffer the size of the targeted weights;
- kept entries keep their value and AdamW moments at their new (re-sorted) positions, grown ones
  start at value 0 with zero moments. Everything is changed in place, so the optimizer, DDP and
  any other holder keep referring to the same tensors.

m follows a cosine decay (the schedule of RigL: Evci et al. 2020, "Rigging the Lottery: Making All
Tickets Winners"): ``fraction × k`` at the first re-selection, falling to 0 at the last step, so
the mask settles while the learning rate decays. Dropping an entry with a nonzero value changes
the model's function by that value; that is the price of the swap, as in RigL.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import MergeStateError
from ..selection.budget import top_k_indices
from ..sparse_linear import SparseLinear

Reduce = Callable[[torch.Tensor], None]  # in-place sum over processes (None: one process)
LossFn = Callable[[], torch.Tensor]  # one forward whose gradient ranks the candidates


# ---------------------------------------------------------------- how many to swap, and when


@dataclass(frozen=True)
class ReselectSchedule:
    """When to re-select (after every ``every`` optimizer steps) and how many entries to swap."""

    every: int
    fraction: float
    total_steps: int

    def due(self, step: int) -> bool:
        """Re-select before the step with index ``step`` (= after ``step`` updates; never before the first)."""
        return self.every > 0 and step > 0 and step % self.every == 0

    def fraction_at(self, step: int) -> float:
        """``fraction`` at the first re-selection, cosine-decayed to 0 at ``total_steps``."""
        span = max(1, self.total_steps - self.every)
        progress = min(1.0, max(0.0, (step - self.every) / span))
        return self.fraction * 0.5 * (1.0 + math.cos(math.pi * progress))

    def count(self, k: int, numel: int, step: int) -> int:
        """Entries of a module with ``k`` of ``numel`` trained to swap at ``step`` (half rounds up)."""
        return min(math.floor(k * self.fraction_at(step) + 0.5), k, numel - k)


# ---------------------------------------------------------------- grow: the dense gradient, one module at a time, per pass


def dense_weight_grad(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dW = grad_outᵀ · x in fp32, [out, in], for any leading batch dims."""
    g2d = grad_out.reshape(-1, grad_out.shape[-1]).float()
    return g2d.transpose(0, 1) @ x.reshape(-1, x.shape[-1]).float()


def best_outside(grad: torch.Tensor, indices: torch.Tensor, count: int, reduce: Reduce | None) -> torch.Tensor:
    """Sorted flat positions of the ``count`` largest |grad| not in ``indices`` (ties: lower position)."""
    if reduce is not None:
        reduce(grad)  # every process then ranks the same summed gradient
    scores = torch.nan_to_num_(grad.abs_(), nan=0.0).view(-1)
    scores[indices] = -1.0  # |g| >= 0 elsewhere, so current entries are never candidates
    return top_k_indices(scores, count)


def growth_candidates(
    layers: dict[str, SparseLinear], counts: dict[str, int], loss_fn: LossFn, reduce: Reduce | None = None,
) -> dict[str, torch.Tensor]:
    """``{module: count best new flat indices}`` from one forward + backward of ``loss_fn()``.

    A forward hook keeps each layer's input (already saved by its autograd function, so no copy)
    and hooks the layer's output gradient, where dW is formed, ranked and dropped again.
    ``torch.autograd.grad`` drives the backward, so no ``.grad`` of the values is touched.
    """
    chosen: dict[str, torch.Tensor] = {}

    def on_grad_of(name: str, module: SparseLinear, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        chosen[name] = best_outside(dense_weight_grad(grad_out, x), module.indices, counts[name], reduce)

    with layer_output_hooks(layers, counts, on_grad_of):
        backward_only(layers, loss_fn)
    return chosen  # a layer the forward never reached is left as it is


def accumulated_growth_candidates(
    layers: dict[str, SparseLinear], counts: dict[str, int], loss_fns: Sequence[LossFn], reduce: Reduce | None = None,
) -> dict[str, torch.Tensor]:
    """Like :func:`growth_candidates`, ranked by |the dense gradient of the summed losses of ``loss_fns``|.

    One forward + backward per loss; each module's dW is added into one fp32 buffer in its hook
    (``addmm_``: no per-pass dW is kept), then summed over processes and ranked once all ran.
    """
    sums: dict[str, torch.Tensor] = {}

    def on_grad_of(name: str, module: SparseLinear, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        if name not in sums:
            sums[name] = dense_weight_grad(grad_out, x)
        else:
            g2d = grad_out.reshape(-1, grad_out.shape[-1]).float()
            sums[name].addmm_(g2d.transpose(0, 1), x.reshape(-1, x.shape[-1]).float())

    for loss_fn in loss_fns:
        with layer_output_hooks(layers, counts, on_grad_of):
            backward_only(layers, loss_fn)
    # Ranked in the layers' order, the same on every process, so their all-reduces pair up.
    return {name: best_outside(sums.pop(name), layers[name].indices, counts[name], reduce)
            for name in [n for n in layers if n in sums]}


GradHook = Callable[[str, SparseLinear, torch.Tensor, torch.Tensor], None]  # (name, layer, input, output gradient)


@contextlib.contextmanager
def layer_output_hooks(layers: dict[str, SparseLinear], counts: dict[str, int], on_grad: GradHook):
    """While open, every layer with a count > 0 calls ``on_grad`` with its input and output gradient
    during the backward of one forward pass. The input is the one its autograd function already
    saved, so nothing is copied; a layer called twice in the pass is an error."""
    called: set[str] = set()

    def on_forward(name: str):
        def hook(module: SparseLinear, args, output: torch.Tensor) -> None:
            if name in called:  # a second call would need its dW summed with the first's
                raise RuntimeError(f"{name} ran twice in one forward; re-selection expects one call per layer")
            called.add(name)
            x = args[0]
            output.register_hook(lambda grad_out: on_grad(name, module, x, grad_out))

        return hook

    active = {n: layer for n, layer in layers.items() if counts.get(n, 0) > 0}
    handles = [layer.register_forward_hook(on_forward(n)) for n, layer in active.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def backward_only(layers: dict[str, SparseLinear], loss_fn: LossFn) -> None:
    """Forward + backward of ``loss_fn()`` through ``torch.autograd.grad``, so no ``.grad`` is touched."""
    loss = loss_fn()
    torch.autograd.grad(loss, [layer.values for layer in layers.values() if layer.values.requires_grad], allow_unused=True)


# ---------------------------------------------------------------- drop, and carry the state


def drop_positions(values: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the ``count`` smallest |value| (ties: the lower position goes first)."""
    return torch.sort(values.detach().abs(), stable=True).indices[:count]


def plan_swap(indices: torch.Tensor, values: torch.Tensor, grown: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The new sorted indices, and for each new slot its old position (-1: grown, starts at zero).

    Drops as many entries as ``grown`` has (which must lie outside ``indices``), so k stays fixed.
    """
    keep = torch.ones(indices.numel(), dtype=torch.bool, device=indices.device)
    keep[drop_positions(values, grown.numel())] = False
    kept_at = keep.nonzero().reshape(-1)
    new_indices, order = torch.sort(torch.cat([indices[kept_at], grown.to(indices.device)]))
    source = torch.cat([kept_at, torch.full((grown.numel(),), -1, dtype=torch.long, device=indices.device)])[order]
    return new_indices, source


def carry(tensor: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``tensor`` rearranged to the new slots: ``out[i] = tensor[source[i]]``, 0 where ``source`` is -1."""
    out = torch.zeros_like(tensor)
    kept = source >= 0
    out[kept] = tensor[source[kept]]
    return out


def per_entry_state(optimizer: torch.optim.Optimizer, values: nn.Parameter) -> list[torch.Tensor]:
    """The optimizer's tensors that hold one number per entry (AdamW: exp_avg, exp_avg_sq), not its step count."""
    state = optimizer.state.get(values, {})
    return [v for v in state.values() if torch.is_tensor(v) and v.shape == values.shape]


@torch.no_grad()
def swap_entries(layer: SparseLinear, optimizer: torch.optim.Optimizer, grown: torch.Tensor) -> None:
    """Replace ``grown.numel()`` of the layer's entries with ``grown``, in place (same tensor objects)."""
    new_indices, source = plan_swap(layer.indices, layer.values, grown)
    for tensor in (layer.values.data, *per_entry_state(optimizer, layer.values)):
        tensor.copy_(carry(tensor, source))
    layer.indices.copy_(new_indices)


# ---------------------------------------------------------------- one re-selection


def check_same_everywhere(layers: dict[str, SparseLinear], reduce_max: Reduce, reduce_min: Reduce) -> None:
    """Fail loudly if processes ended up with different masks (their values would then drift apart)."""
    positions = [torch.arange(1, layer.k + 1, device=layer.indices.device) for layer in layers.values()]
    sums = torch.stack([torch.stack([layer.indices.sum(), (layer.indices * p).sum()]) for layer, p in zip(layers.values(), positions)])
    high, low = sums.clone(), sums.clone()
    reduce_max(high)
    reduce_min(low)
    if not torch.equal(high, low):
        raise RuntimeError("re-selection chose different entries on different processes")


def reselect(
    layers: dict[str, SparseLinear], optimizer: torch.optim.Optimizer, schedule: ReselectSchedule, step: int,
    loss_fn: LossFn | Sequence[LossFn], reduce: Reduce | None = None,
) -> dict[str, int]:
    """Swap entries in every layer as ``schedule`` says for ``step``; returns ``{module: entries swapped}``.

    ``loss_fn`` runs the forward whose gradient ranks the candidates; a sequence of them ranks by the
    gradient of their summed losses (:func:`accumulated_growth_candidates`). Call this in eval mode if
    the model has dropout (the loop does), so the choice does not depend on chance.
    """
    if any(layer.merged for layer in layers.values()):
        raise MergeStateError("cannot re-select entries of a merged model; call unmerge() first")
    counts = {n: schedule.count(layer.k, layer.weight.numel(), step) for n, layer in layers.items()}
    if not any(counts.values()):
        return {}
    losses = [loss_fn] if callable(loss_fn) else list(loss_fn)
    if not losses:
        raise ValueError("re-selection needs at least one loss to rank the candidates")
    if len(losses) == 1:  # one module's dense gradient at a time, as long as it is one pass
        grown = growth_candidates(layers, counts, losses[0], reduce)
    else:
        grown = accumulated_growth_candidates(layers, counts, losses, reduce)
    for name, indices in grown.items():
        swap_entries(layers[name], optimizer, indices)
    return {name: int(indices.numel()) for name, indices in grown.items()}
