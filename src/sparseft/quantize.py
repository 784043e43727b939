"""A weight-only quantized base under a sparse diff: y = base_q(x) + Δ(x).

The base's linear weights are stored as int8, int4 or NF4 codes with scales (torchao's weight-only
schemes; ``pip install 'sparseft[quant]'``); the k values stay fp32 and are never merged into the
codes: ``SparseLinear`` runs unmerged over a quantized weight. The diff's base fingerprint hashes
the weights as stored (codes and scales, keyed by their class, see ``base_match.weight_kind``), so a
diff trained over an int8 base loads only onto that same int8 base.

``nf4`` is QLoRA's 4-bit NormalFloat, two codes per byte (torchao's ``NF4Tensor``, the format
torchtune's QLoRA trains over). int4 on CPU keeps one code per byte (torchao 0.18's packed int4
layouts need a GPU kernel library). ``q4_1`` is llama.cpp's GGUF block format (``blockquant``, no
torchao): 4-bit codes, two per byte, with an fp16 scale and minimum per 32 weights, and the token
embedding with a head tied to it in Q8_0 blocks — the layout of the GGUF SmolLM2 is converted from,
which it therefore stores exactly.

    >>> base = quantize_base(load_model("smollm2-135m"), "int8")  # doctest: +SKIP
    >>> sparse = SparseModel.from_pretrained(base, "runs/a")  # doctest: +SKIP
"""

from __future__ import annotations

import fnmatch
import importlib
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blockquant import BLOCK, quantize_q4_1, quantize_q8_0
from .errors import ConfigError

QUANT_SCHEMES = ("int8", "int4", "nf4", "q4_1")
# Where a diff over a quantized base starts: "correction" sets each selected entry's value to its
# quantization error, so those entries begin at their full-precision weights; "zero" starts at 0;
# "correction-after" starts at 0 and adds that error once training ends (see add_deferred_correction).
QUANT_INITS = ("correction", "correction-after", "zero")
DEFERRED = "correction-after"
# Where the entries are chosen when the base is quantized: over the full-precision weights (then quantized),
# or over the quantized base itself (its gradients; the full-precision weights are then only loaded).
SELECT_OVER = ("full", "quantized")
DEFAULT_SELECT_OVER = "full"  # TrainConfig's default: over the quantized base chose worse entries (docs/training.md)
DEFAULT_QUANT_INIT = "zero"  # TrainConfig's default: trained from the error was not better (docs/training.md,
# "Starting at the quantization error")
# The class of each scheme's weights (torchao's, or blockquant's): what a diff's base fingerprint is keyed by
# (base_match.weight_kind)
WEIGHT_CLASSES = {"int8": "Int8Tensor", "int4": "IntxUnpackedToInt8Tensor", "nf4": "NF4Tensor", "q4_1": "Q4_1Tensor"}
EMBEDDING_CLASSES = {"q4_1": "Q8_0Tensor"}  # q4_1 also stores the embedding (and a head tied to it): Q8_0 blocks
TORCHAO_SCHEMES = ("int8", "int4", "nf4")
INT4_GROUP = 32  # int4 scales: one per 32 input columns of a row (in_features must divide by it)
NF4_BLOCK = 64  # nf4: one absmax scale per 64 consecutive weights of the flattened matrix (QLoRA's) ...
NF4_SCALE_GROUP = 256  # ... and those scales quantized again to int8, one factor per 256 of them (QLoRA's)


def quant_config(scheme: str):
    """torchao's weight-only config for ``scheme``: int8 with a scale per output row, or int4 in groups
    (nf4 has none: its scale groups are chosen per layer, see ``to_nf4_weight``)."""
    require_torchao(scheme)
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    if scheme == "int8":
        return Int8WeightOnlyConfig()
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP))


def require_torchao(scheme: str) -> None:
    """Raise a ``ConfigError`` saying how to install torchao when ``scheme`` needs it and it is missing."""
    if scheme not in TORCHAO_SCHEMES:
        return
    try:
        importlib.import_module("torchao")
    except ImportError as e:
        raise ConfigError(f"quantize={scheme!r} needs torchao: pip install 'sparseft[quant]' ({e})") from e


def nf4_scale_group(numel: int) -> int:
    """How many block scales share one int8 factor: QLoRA's 256 when the layer's block count divides
    by it, else the largest group below that does (SmolLM2's k_proj has 1728 blocks: groups of 216)."""
    blocks = numel // NF4_BLOCK
    return max(size for size in range(1, NF4_SCALE_GROUP + 1) if blocks % size == 0)


def to_nf4_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as torchao's ``NF4Tensor``: same shape and dtype, stored as packed 4-bit codes
    (uint8, two per byte) + int8 block scales + one factor per scale group; deterministic."""
    from torchao.quantization import to_nf4

    return to_nf4(weight.detach().contiguous(), NF4_BLOCK, nf4_scale_group(weight.numel()))


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """The dense weight a quantized one stands for (a transient copy, one layer at a time)."""
    if type(weight).__name__ == "NF4Tensor":  # its ``dequantize`` is a per-code helper, not this
        return weight.get_original_weight()
    return weight.dequantize()


def is_quantized(weight: torch.Tensor) -> bool:
    """A weight stored as codes and scales (torchao's tensor subclasses): no entry can be written into it."""
    from .base_match import is_wrapper_tensor

    return is_wrapper_tensor(weight)


def scheme_of_weight_class(kind: str) -> str | None:
    """The scheme whose weights are stored as the class ``kind`` (``"Int8Tensor"`` → ``"int8"``), else None."""
    classes = [*WEIGHT_CLASSES.items(), *EMBEDDING_CLASSES.items()]
    return next((scheme for scheme, name in classes if name == kind), None)


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
        return grad_out @ dequantized(ctx.weight).to(grad_out.dtype), None, None


class QuantizedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is quantized and frozen (``quantize_base`` turns layers into it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FrozenQuantizedMatmul.apply(x, self.weight, self.bias)


def quantize_base(model: nn.Module, scheme: str, skip: Sequence[str] = ()) -> nn.Module:
    """Quantize the ``nn.Linear`` weights of ``model`` in place (weight-only ``scheme``: int8, int4, nf4
    or q4_1) and freeze them; returns ``model``. Norms stay as they are (in the model's dtype), and so
    do the embeddings and a head tied to them (a quantized copy would be extra memory, not less) except
    under q4_1, which stores the input embedding (and a head tied to it) in Q8_0 blocks as GGUF files
    do (``quantize_embedding``). ``skip``: patterns (``fnmatch``, e.g. ``"*.down_proj"``, ``"model.layers.[0-3].*"``) of
    linear layers to leave in the model's dtype too, a mixed base like bitsandbytes' skipped modules;
    each pattern must match a layer. Deterministic: the same weights give the same codes, so a
    reloaded base matches the fingerprint a diff recorded."""
    check_scheme(scheme)
    require_torchao(scheme)
    chosen = linear_layers(model, skip)
    if scheme == "nf4":
        check_nf4_shapes(chosen)  # every layer before any: a refused model is left as it was
        for module in chosen.values():
            module.weight = nn.Parameter(to_nf4_weight(module.weight), requires_grad=False)
    elif scheme == "q4_1":
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        check_block_shapes({**chosen, **({"the input embedding": embedding} if embedding is not None else {})})
        for module in chosen.values():
            module.weight = nn.Parameter(quantize_q4_1(module.weight), requires_grad=False)
        if embedding is not None:
            quantize_embedding(model, embedding)
    else:
        from torchao.quantization import quantize_

        modules = list(chosen.values())
        quantize_(model, quant_config(scheme), filter_fn=lambda module, _name: any(module is m for m in modules))
    for module in chosen.values():
        module.weight.requires_grad_(False)
        module.__class__ = QuantizedLinear  # same module, same state; only the forward changes
    copy_out_of_shared_storage(model)
    return model


def quantize_embedding(model: nn.Module, embedding: nn.Embedding) -> None:
    """Store the input embedding in Q8_0 blocks, frozen; a head tied to it keeps the tie (the same
    parameter) and runs as a ``QuantizedLinear``, so its backward dequantizes again instead of holding
    a dense copy of the vocabulary's weights."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = getattr(head, "base_layer", head)  # a head the diff targets: its SparseLinear's layer holds the weight
    tied = head is not None and head.weight is embedding.weight
    embedding.weight = nn.Parameter(quantize_q8_0(embedding.weight), requires_grad=False)
    if tied:
        head.weight = embedding.weight
        head.__class__ = QuantizedLinear


def check_block_shapes(modules: dict[str, nn.Module]) -> None:
    for name, module in modules.items():
        if module.weight.shape[-1] % BLOCK:
            raise ConfigError(f"quantize='q4_1': {name} has rows of {module.weight.shape[-1]} weights, "
                              f"which do not split into GGUF blocks of {BLOCK}")


def dequantize_base(model: nn.Module) -> nn.Module:
    """Turn every quantized linear layer of ``model`` (and a quantized embedding) back into a plain one in
    place, its weight the dense one its codes stand for (``dequantized``, in the dtype it was quantized
    from); returns ``model``. For export (``sparseft apply --quantize``): a diff trained over the quantized
    base merges into these weights, so the merged model computes what the diff unmerged over the codes
    did. These are not the weights ``quantize_base`` started from (quantization rounded them; q4_1 over
    weights already on its grid is the exception), and a wrapping ``SparseModel``'s base fingerprint,
    taken over the codes, no longer describes them.

        >>> plain = dequantize_base(quantize_base(make_tiny_llama(), "int8"))  # doctest: +SKIP
    """
    # By the stored weight, kept alive so its id stays its own: a head tied to the embeddings gets the same
    # dense weight. The codes go when this returns.
    dense: dict[int, tuple[torch.Tensor, nn.Parameter]] = {}
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and is_quantized(module.weight):
            stored = module.weight
            if id(stored) not in dense:
                dense[id(stored)] = (stored, nn.Parameter(dequantized(stored).to(stored.dtype), requires_grad=False))
            module.weight = dense[id(stored)][1]
            if type(module) is QuantizedLinear:
                module.__class__ = nn.Linear  # the plain forward again: a dense weight needs no custom backward
    return model


def linear_layers(model: nn.Module, skip: Sequence[str] = ()) -> dict[str, nn.Linear]:
    """The plain ``nn.Linear`` layers to quantize: all but a head tied to the input embeddings and those
    whose name matches a ``skip`` pattern (a ``SparseLinear``'s wrapped layer goes by the wrapper's name)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = embeddings.weight if embeddings is not None else None
    layers = {name: m for name, m in model.named_modules() if type(m) is nn.Linear and m.weight is not tied}
    skip = skip_patterns(skip)
    check_skip_patterns(skip, [layer_name(name) for name in layers])
    return {name: m for name, m in layers.items() if not skipped(layer_name(name), skip)}


def layer_name(name: str) -> str:
    """A linear layer's name as a user writes it: ``SparseModel`` wraps it as ``<name>.base_layer``."""
    return name.removesuffix(".base_layer")


def skipped(name: str, skip: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)


def skip_patterns(value: object) -> list[str]:
    """``quantize_skip`` as a list of distinct patterns, in the order given: from YAML or Python a list,
    from the CLI one comma-separated string (a comma inside ``[...]`` belongs to its pattern)."""
    if isinstance(value, str):
        value = [p.strip() for p in re.split(r",(?![^\[]*\])", value) if p.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
        raise ConfigError(f"quantize_skip must be a list of layer-name patterns (or one comma-separated string), "
                          f"got {value!r}")
    return list(dict.fromkeys(value))


def check_skip_patterns(skip: Sequence[str], names: list[str]) -> None:
    """Each skip pattern names at least one linear layer (a typo would quantize everything)."""
    for pattern in skip:
        if not any(skipped(name, [pattern]) for name in names):
            raise ConfigError(f"quantize_skip pattern {pattern!r} matches no linear layer of the model "
                              f"(fnmatch over names such as {', '.join(names[:3])})")


def check_quantize_skip(model: nn.Module, skip: Sequence[str], targets: Sequence[str]) -> None:
    """A run's skip patterns, before anything is selected or quantized: each names a linear layer, only
    layers the diff targets (its base fingerprint covers exactly those, so a skipped layer outside them
    could not be told from a quantized one), and at least one targeted layer stays quantized (else the
    base would be the plain one under another name)."""
    from .targets import find_targets

    layers = [layer_name(name) for name in linear_layers(model, skip=())]
    check_skip_patterns(skip, layers)
    targeted = {layer_name(name) for name in find_targets(model, list(targets))}
    outside = [name for name in layers if skipped(name, skip) and name not in targeted]
    if outside:
        raise ConfigError(f"quantize_skip names {', '.join(outside[:3])}{' ...' if len(outside) > 3 else ''}, "
                          f"which the diff does not target (target_modules {list(targets)}): the diff's base "
                          "fingerprint covers only targeted weights, so a skip there could not be checked on load")
    if all(skipped(name, skip) for name in targeted):
        raise ConfigError(f"quantize_skip {list(skip)} leaves none of the targeted layers quantized: drop "
                          "--quantize for a plain base")


def check_nf4_shapes(layers: dict[str, nn.Linear]) -> None:
    for name, module in layers.items():
        if module.weight.numel() % NF4_BLOCK:
            raise ConfigError(f"quantize='nf4': {name} has {tuple(module.weight.shape)} weights, "
                              f"{module.weight.numel()} in all, not a multiple of the NF4 block of {NF4_BLOCK}")


def copy_out_of_shared_storage(model: nn.Module) -> None:
    """Give the tensors left unquantized (embeddings, norms, buffers) memory of their own.

    A model loaded from safetensors keeps its weights in one memory-mapped file; while any tensor
    still points into it, the pages of the freed full-precision weights stay resident (file-backed),
    and the quantized base would cost more RSS than the one it replaced (measured on SmolLM2-135M).
    Ties survive: the parameter objects stay, only their data moves.
    """
    from .base_match import is_wrapper_tensor

    with torch.no_grad():
        for param in model.parameters():
            if not is_wrapper_tensor(param):
                param.data = param.data.clone()
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.clone()


def quantize_sparse_model(sparse, scheme: str, init: str = DEFAULT_QUANT_INIT, skip: Sequence[str] = ()):
    """Quantize the base under a ``SparseModel`` whose entries were selected on its full-precision
    weights (so any scorer works); the layers switch to the unmerged forward and the recorded
    base fingerprint becomes that of the quantized weights, which is what the diff will be loaded onto.

    ``init="correction"`` adds each selected entry's quantization error W − dequantized(Q(W)) to its
    value (LoftQ's idea, Li et al. 2023, for a low-rank adapter; here exact at the k entries): the
    entries that matter most for the task then start at their full-precision weights instead of their
    rounded ones. Diffs trained from that start were no better than those trained from zero
    (docs/training.md, "Starting at the quantization error"). ``init="correction-after"`` keeps the
    values at 0 and holds the errors in ``sparse.deferred_correction`` for ``add_deferred_correction``
    to add once training ends: the diff trains over the rounded base and is saved with its entries back
    at full precision plus what training added."""
    from .base_match import fingerprints

    check_quant_init(init)
    if sparse.merged:
        raise ConfigError("quantize the base of an unmerged SparseModel (call unmerge() first)")
    layers = sparse.sparse_layers()
    originals = selected_weights(layers) if init != "zero" else {}
    quantize_base(sparse.base_model, scheme, skip)
    errors = {}
    for name, layer in layers.items():
        if not is_quantized(layer.weight):
            continue  # skipped: a plain weight keeps the forward SparseModel gives it, as on reload
        layer.set_kernels(layer.backend, "unmerged")
        if name in originals:
            with torch.no_grad():  # one layer dequantized at a time
                errors[name] = originals[name] - dequantized(layer.weight).reshape(-1)[layer.indices].float()
    if init == "correction":
        add_to_values(layers, errors)
    sparse.deferred_correction = errors if init == DEFERRED else {}
    sparse.base_fingerprint = fingerprints({name: layer.weight for name, layer in layers.items()})
    return sparse


def add_deferred_correction(sparse) -> None:
    """Add the quantization errors ``quantize_sparse_model(init="correction-after")`` held back to the
    trained values, once (a second call adds nothing)."""
    add_to_values(sparse.sparse_layers(), getattr(sparse, "deferred_correction", {}))
    sparse.deferred_correction = {}


def add_to_values(layers, errors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, error in errors.items():
            values = layers[name].values
            values += error.to(device=values.device, dtype=values.dtype)


def selected_weights(layers) -> dict[str, torch.Tensor]:
    """Each layer's full-precision weights at its selected entries, fp32 (k values, not the weights)."""
    return {name: layer.weight.detach().reshape(-1)[layer.indices].float() for name, layer in layers.items() if layer.k}


def check_quant_init(init: str, reselecting: bool = False) -> None:
    if init not in QUANT_INITS:
        raise ConfigError(f"quantize_init must be one of {list(QUANT_INITS)}, got {init!r}")
    if init == DEFERRED and reselecting:
        raise ConfigError("quantize_init='correction-after' adds each chosen entry's quantization error when "
                          "training ends; with reselect_every the entries move and the full-precision weights of "
                          "new ones are gone: use quantize_init='zero' or 'correction'")


def check_select_over(select_over: str, init: str) -> None:
    if select_over not in SELECT_OVER:
        raise ConfigError(f"select_over must be one of {list(SELECT_OVER)}, got {select_over!r}")
    if select_over == "quantized" and init != "zero":
        raise ConfigError(f"quantize_init={init!r} needs the full-precision weights of the chosen entries, "
                          "which selection over the quantized base no longer has: use select_over='full' "
                          "or quantize_init='zero'")
