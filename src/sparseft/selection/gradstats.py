"""Gradient statistics over calibration batches: Σ_b g_b and Σ_b g_b² per targeted weight.

Memory is the point of this module. A plain ``loss.backward()`` would leave a ``.grad`` for every
parameter (one model-sized buffer) and the sums would add one or two more. Instead only the weights
being measured require grad, and a post-accumulate hook folds each weight's gradient into fp32 CPU
accumulators and drops it at once, so at most one module's gradient exists beyond the accumulators.
``select`` decides how many modules are measured per pass so the accumulators fit its budget.

Compact sums. Every pass costs one forward and backward per calibration batch, so when the fp32 sums
of all modules would not fit in one pass, ``select`` keeps them compact instead: fp16 scaled by a
per-module power of two (``StatSum``), 2 bytes per entry per statistic, which halves the passes
(``combined`` on SmolLM2-135M in fp32: one pass instead of two). Each batch's sum is formed in fp32
and rounded once to fp16's 11 significant bits (relative error <= 2**-11 per batch), and the scale
keeps the module's largest sum between 2**11 and 2**15, so only entries below ~2**-25 of that largest
sum lose precision. The scores are therefore those of fp32 up to near-ties: two entries whose sums differ by
less than about B × 2**-11 relatively may swap order (tests/test_selection.py checks the masks).

Quantized layers. A weight stored as int8/int4/nf4 codes (``sparseft.quantize``) has no gradient of its
own, so for those layers g = grad_outᵀ · x is formed from the layer's input and output gradient, one
layer at a time in the backward pass (what autograd forms for a plain weight): the statistics of the
quantized base, equal to those of a plain model holding its dequantized weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Iterable, Iterator

import torch
from torch import nn

from ..errors import DataFormatError
from ..quantize import is_quantized
from .scorers import GRAD_SQ_SUM, GRAD_SUM

STAT_BYTES = 4  # fp32 accumulators
COMPACT_STAT_BYTES = 2  # fp16 accumulators with a per-module power-of-two scale
COMPACT_TOP_EXPONENT = 14  # a rescaled module's largest |sum| lands in (2**13, 2**14]; fp16 ends at 65504 < 2**16
# The scale changes only when the largest |sum| leaves this band (rescaling is exact, but costs a pass).
COMPACT_LOW, COMPACT_HIGH = 2.0**11, 2.0**15


def largest_magnitude(t: torch.Tensor) -> float:
    low, high = torch.aminmax(t)
    return max(-float(low), float(high))


class StatSum:
    """Σ of fp32 CPU tensors of one shape: in fp32 (exact as before), or compact (fp16 × 2**-e)."""

    def __init__(self, shape: torch.Size, compact: bool = False):
        self.compact = compact
        self.data = torch.zeros(shape, dtype=torch.float16 if compact else torch.float32)
        self.scale = 1.0  # data = sum × scale; a power of two, so scaling is exact

    def add(self, x: torch.Tensor) -> None:
        if not self.compact:
            self.data.add_(x)
            return
        total = self.data.float().add_(x, alpha=self.scale)  # the new sum, scaled, in fp32 (one module transient)
        largest = largest_magnitude(total)
        if not math.isfinite(largest) and bool(torch.isfinite(x).all()):
            total = self.data.float().div_(self.scale).add_(x)  # x far larger than the sum so far: unscaled
            self.scale, largest = 1.0, largest_magnitude(total)
        if math.isfinite(largest) and largest > 0 and not COMPACT_LOW <= largest <= COMPACT_HIGH:
            # Capped so the scale stays a normal fp32 number even for sums of denormal size.
            shift = min(COMPACT_TOP_EXPONENT - math.ceil(math.log2(largest)), 100 - round(math.log2(self.scale)))
            total.mul_(2.0**shift)
            self.scale *= 2.0**shift
        self.data.copy_(total)  # rounded once to fp16; non-finite sums stay non-finite: scoring refuses them

    def value(self) -> torch.Tensor:
        """The sum as an fp32 tensor (the stored one itself when not compact)."""
        return self.data if not self.compact else self.data.float().div_(self.scale)


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
    model: nn.Module,
    layers: dict[str, nn.Linear],
    batches: list[Mapping],
    stats: tuple[str, ...],
    compact: bool = False,
) -> dict[str, dict[str, StatSum]]:
    """``{module: {stat: StatSum}}`` with Σ g (``grad_sum``) and/or Σ g² (``grad_sq_sum``), from one
    forward and backward per batch; ``compact`` keeps them in fp16 (see the module docstring).

    g_b is the gradient of batch b's mean loss ``model(**batch).loss`` with respect to each weight.
    """
    sums = {name: {s: StatSum(layer.weight.shape, compact) for s in stats} for name, layer in layers.items()}

    def fold(acc: dict[str, StatSum], g: torch.Tensor) -> None:
        g = g.to(device="cpu", dtype=torch.float32)
        if GRAD_SUM in acc:
            acc[GRAD_SUM].add(g)
        if GRAD_SQ_SUM in acc:
            if compact:
                acc[GRAD_SQ_SUM].add(g.square_())  # g is not needed after this
            else:
                acc[GRAD_SQ_SUM].data.addcmul_(g, g)

    def fold_weight_grad(acc: dict[str, StatSum]):
        def hook(weight: torch.Tensor) -> None:
            g = weight.grad.detach()
            weight.grad = None  # freed now, not at the end of the backward pass
            fold(acc, g)

        return hook

    plain = {name: layer for name, layer in layers.items() if not is_quantized(layer.weight)}
    quantized = {name: layer for name, layer in layers.items() if is_quantized(layer.weight)}
    device = next(iter(layers.values())).weight.device
    with measuring(model, [layer.weight for layer in plain.values()]), torch.enable_grad():
        handles = [layer.weight.register_post_accumulate_grad_hook(fold_weight_grad(sums[name]))
                   for name, layer in plain.items()]
        handles += [layer.register_forward_hook(fold_from_activations(lambda g, name=name: fold(sums[name], g)))
                    for name, layer in quantized.items()]
        if quantized:  # the graph must reach them even when no parameter requires grad
            handles.append(model.get_input_embeddings().register_forward_hook(require_grad))
        try:
            for i, batch in enumerate(batches):
                batch_loss(model, batch, i, device).backward()
        finally:
            for h in handles:
                h.remove()
    return sums


def fold_from_activations(fold_grad):
    """A forward hook for a linear layer whose weight has no gradient: when the backward reaches the
    layer's output, its weight gradient grad_outᵀ · x (fp32) goes to ``fold_grad``. x is held until the
    backward is done, as autograd holds a plain layer's input for its weight gradient."""
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0].detach()

        def on_grad(grad_out: torch.Tensor) -> None:
            g = grad_out.reshape(-1, grad_out.shape[-1]).float().t() @ x.reshape(-1, x.shape[-1]).float()
            fold_grad(g)

        if output.requires_grad:  # it does whenever the loss depends on this layer (see require_grad)
            output.register_hook(on_grad)

    return hook


def require_grad(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """The embeddings' output as a leaf that requires grad: the backward then runs through every layer."""
    return output.detach().requires_grad_()
