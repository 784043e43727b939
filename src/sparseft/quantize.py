"""A weight-only quantized base under a sparse diff: y = base_q(x) + Δ(x).

The base's linear weights are stored as int8 or int4 codes with scales (torchao's weight-only
schemes; ``pip install 'sparseft[quant]'``); the k values stay fp32 and are never merged into the
codes: ``SparseLinear`` runs unmerged over a quantized weight. The diff's base fingerprint hashes
the weights as stored (codes and scales, keyed by their class, see ``diffio.weight_kind``), so a
diff trained over an int8 base loads only onto that same int8 base.

    >>> base = quantize_base(load_model("smollm2-135m"), "int8")  # doctest: +SKIP
    >>> sparse = SparseModel.from_pretrained(base, "runs/a")  # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

QUANT_SCHEMES = ("int8", "int4")
INT4_GROUP = 32  # int4 scales: one per 32 input columns of a row (in_features must divide by it)


def quant_config(scheme: str):
    """torchao's weight-only config for ``scheme``: int8 with a scale per output row, or int4 in groups."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup
    except ImportError as e:
        raise ConfigError(f"quantize={scheme!r} needs torchao: pip install 'sparseft[quant]' ({e})") from e
    if scheme == "int8":
        return Int8WeightOnlyConfig()
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP))


def is_quantized(weight: torch.Tensor) -> bool:
    """A weight stored as codes and scales (torchao's tensor subclasses): no entry can be written into it."""
    from .diffio import is_wrapper_tensor

    return is_wrapper_tensor(weight)


def check_scheme(scheme: str) -> None:
    if scheme not in QUANT_SCHEMES:
        raise ConfigError(f"quantize must be one of {sorted(QUANT_SCHEMES)}, got {scheme!r}")


class FrozenQuantizedMatmul(torch.autograd.Function):
    """y = x Wᵀ + b over a quantized W that never trains.

    Autograd through torchao's linear would save the dequantized fp32 W for grad_x: a dense copy of
    the whole base held until backward. This keeps a reference to W as stored and dequantizes it
    again, one layer at a time, in backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # frozen: no version check needed
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out @ ctx.weight.dequantize().to(grad_out.dtype), None, None


class QuantizedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is quantized and frozen (``quantize_base`` turns layers into it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FrozenQuantizedMatmul.apply(x, self.weight, self.bias)


def quantize_base(model: nn.Module, scheme: str) -> nn.Module:
    """Quantize the ``nn.Linear`` weights of ``model`` in place (weight-only ``scheme``: int8 or int4)
    and freeze them; returns ``model``. Embeddings and norms stay as they are, and so does a head
    tied to the embeddings (a quantized copy would be extra memory, not less). Deterministic: the
    same weights give the same codes, so a reloaded base matches the fingerprint a diff recorded."""
    check_scheme(scheme)
    config = quant_config(scheme)
    from torchao.quantization import quantize_

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = embeddings.weight if embeddings is not None else None
    chosen = [m for m in model.modules() if type(m) is nn.Linear and m.weight is not tied]
    quantize_(model, config, filter_fn=lambda module, _name: any(module is m for m in chosen))
    for module in chosen:
        module.weight.requires_grad_(False)
        module.__class__ = QuantizedLinear  # same module, same state; only the forward changes
    copy_out_of_shared_storage(model)
    return model


def copy_out_of_shared_storage(model: nn.Module) -> None:
    """Give the tensors left unquantized (embeddings, norms, buffers) memory of their own.

    A model loaded from safetensors keeps its weights in one memory-mapped file; while any tensor
    still points into it, the pages of the freed full-precision weights stay resident (file-backed),
    and the quantized base would cost more RSS than the one it replaced (measured on SmolLM2-135M).
    Ties survive: the parameter objects stay, only their data moves.
    """
    from .diffio import is_wrapper_tensor

    with torch.no_grad():
        for param in model.parameters():
            if not is_wrapper_tensor(param):
                param.data = param.data.clone()
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.clone()


def quantize_sparse_model(sparse, scheme: str):
    """Quantize the base under a ``SparseModel`` whose entries were selected on its full-precision
    weights (so any scorer works); the layers switch to the unmerged forward and the recorded
    base fingerprint becomes that of the quantized weights, which is what the diff will be loaded onto."""
    from .diffio import fingerprints

    if sparse.merged:
        raise ConfigError("quantize the base of an unmerged SparseModel (call unmerge() first)")
    quantize_base(sparse.base_model, scheme)
    layers = sparse.sparse_layers()
    for layer in layers.values():
        layer.set_kernels(layer.backend, "unmerged")
    sparse.base_fingerprint = fingerprints({name: layer.weight for name, layer in layers.items()})
    return sparse
