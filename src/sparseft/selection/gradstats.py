"""Gradient statistics over calibration batches: Σ_b g_b and Σ_b g_b² per targeted weight.

Memory is the point of this module. A plain ``loss.backward()`` would leave a ``.grad`` for every
parameter (one model-sized buffer) and the sums would add one or two more. Instead only the weights
being measured require grad, and a post-accumulate hook folds each weight's gradient into fp32 CPU
accumulators and drops it at once, so at most one module's gradient exists beyond the accumulators.
``select`` decides how many modules are measured per pass so the accumulators fit its budget.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Iterable, Iterator

import torch
from torch import nn

from ..errors import DataFormatError
from .scorers import GRAD_SQ_SUM, GRAD_SUM

STAT_BYTES = 4  # accumulators are fp32


def take_batches(dataloader: Iterable, num_batches: int) -> list[Mapping]:
    """The first ``num_batches`` batches, kept so every pass sees the same data in the same order."""
    batches = []
    for i, batch in enumerate(dataloader):
        if i >= num_batches:
            break
        if not isinstance(batch, Mapping):  # dicts, and HF BatchEncoding
            raise DataFormatError(
                f"calibration batch {i} is a {type(batch).__name__}; expected a mapping of tensors "
                "(input_ids, attention_mask, labels)"
            )
        batches.append(batch)
    if not batches:
        raise DataFormatError("the calibration dataloader yielded no batches")
    return batches


@contextlib.contextmanager
def measuring(model: nn.Module, weights: list[nn.Parameter]) -> Iterator[None]:
    """Only ``weights`` require grad and the model is in eval mode; everything is restored after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    old_grads = {w: w.grad for w in weights}
    was_training = model.training
    try:
        for p in flags:
            p.requires_grad_(False)
        for w in weights:
            w.grad = None
            w.requires_grad_(True)
        model.eval()  # no dropout: the statistics must not depend on chance
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for w, g in old_grads.items():
            w.grad = g
        model.train(was_training)


def batch_loss(model: nn.Module, batch: Mapping, index: int, device: torch.device) -> torch.Tensor:
    moved = {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
    out = model(**moved)
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    if loss is None:
        raise DataFormatError(
            f"calibration batch {index}: the model returned no loss; batches need a 'labels' tensor "
            f"(keys given: {sorted(batch)})"
        )
    if not math.isfinite(float(loss.detach())):
        raise DataFormatError(f"calibration batch {index}: the loss is {float(loss)} (does every row have labels?)")
    return loss


def accumulate_gradients(
    model: nn.Module, layers: dict[str, nn.Linear], batches: list[Mapping], stats: tuple[str, ...]
) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {stat: fp32 CPU tensor}}`` with Σ g (``grad_sum``) and/or Σ g² (``grad_sq_sum``).

    g_b is the gradient of batch b's mean loss ``model(**batch).loss`` with respect to each weight.
    """
    sums = {name: {s: torch.zeros(layer.weight.shape, dtype=torch.float32) for s in stats} for name, layer in layers.items()}

    def fold_into(acc: dict[str, torch.Tensor]):
        def hook(weight: torch.Tensor) -> None:
            g = weight.grad.detach().to(device="cpu", dtype=torch.float32)
            if GRAD_SUM in acc:
                acc[GRAD_SUM].add_(g)
            if GRAD_SQ_SUM in acc:
                acc[GRAD_SQ_SUM].addcmul_(g, g)
            weight.grad = None  # freed now, not at the end of the backward pass

        return hook

    weights = [layer.weight for layer in layers.values()]
    device = weights[0].device
    with measuring(model, weights), torch.enable_grad():
        handles = [layer.weight.register_post_accumulate_grad_hook(fold_into(sums[name])) for name, layer in layers.items()]
        try:
            for i, batch in enumerate(batches):
                batch_loss(model, batch, i, device).backward()
        finally:
            for h in handles:
                h.remove()
    return sums
