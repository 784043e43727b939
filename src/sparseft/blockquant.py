"""Weights stored in llama.cpp's GGUF block formats, as tensors: ``Q4_1Tensor`` and ``Q8_0Tensor``.

Each run of 32 consecutive weights of a row is one block. Q4_1 keeps a 4-bit code per weight (two
per byte) and an fp16 scale and minimum per block, w = code · scale + min (5 bits a weight); Q8_0
keeps an int8 code per weight and an fp16 scale per block, w = code · scale (8.5 bits a weight).
The formats are GGUF's (ggml's ``block_q4_1`` / ``block_q8_0``); the packing here is not theirs
byte for byte, only the numbers it stands for.

Why these, beside torchao's: the SmolLM2 checkpoint sparseft ships is converted from a Q4_1 GGUF
(token embedding Q8_0), so its fp32 weights are already on these grids. Quantized again to NF4 or
int4 they are rounded a second time; stored in their own blocks they come back exactly (the codes a
block was written with are found again from its minimum and maximum: ``quantize_q4_1`` below), and a
diff trained over the 4-bit base trains over the very weights of the full-precision one.

Like torchao's weights they are tensor subclasses with the logical shape and dtype and their codes
and scales as inner tensors (``__tensor_flatten__``), so fingerprints, ``dequantized`` and
``QuantizedLinear`` treat them as they treat the others. ``F.linear`` and ``F.embedding`` over one
dequantize it (an embedding only the rows looked up); other ops are refused by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 32  # weights per block, along a row (GGUF's QK4_1 and QK8_0)
aten = torch.ops.aten


class BlockTensor(torch.Tensor):
    """A frozen weight stored as GGUF blocks; subclasses say how a block's codes become numbers."""

    inner_names: tuple[str, ...] = ()

    @staticmethod
    def __new__(cls, inner: dict[str, torch.Tensor], shape: torch.Size, dtype: torch.dtype):
        first = inner[cls.inner_names[0]]
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=first.device, requires_grad=False)

    def __init__(self, inner: dict[str, torch.Tensor], shape: torch.Size, dtype: torch.dtype):
        for name in self.inner_names:
            setattr(self, name, inner[name])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype})"

    def __tensor_flatten__(self):
        return list(self.inner_names), (self.shape, self.dtype)

    @classmethod
    def __tensor_unflatten__(cls, inner, meta, outer_size, outer_stride):
        shape, dtype = meta
        return cls(inner, shape, dtype)

    def inner(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.inner_names}

    def with_inner(self, fn) -> BlockTensor:
        return type(self)({name: fn(t) for name, t in self.inner().items()}, self.shape, self.dtype)

    def dequantize(self) -> torch.Tensor:
        """The dense weight, in the dtype it was quantized from."""
        return self.block_values().reshape(self.shape).to(self.dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of the dense weight (an embedding lookup), dequantizing only those."""
        flat = index.reshape(-1)
        inner = {name: t.reshape(self.shape[0], -1)[flat].reshape(-1) for name, t in self.inner().items()}
        picked = type(self)(inner, torch.Size((flat.numel(), self.shape[-1])), self.dtype)
        return picked.dequantize().reshape(*index.shape, self.shape[-1])

    def block_values(self) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, *rest = args
            return F.linear(x, dense(weight), *(dense(t) for t in rest), **kwargs)
        if func is F.embedding:
            index, weight, *_ = args
            if rest_given(args[2:], kwargs):
                raise NotImplementedError(f"{cls.__name__}: F.embedding with padding_idx/max_norm options")
            return weight.rows(index)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        weight = args[0]
        if func in (aten.detach.default, aten.alias.default):
            return weight.with_inner(lambda t: t)  # frozen codes: a view needs no copy
        if func is aten.clone.default:
            return weight.with_inner(torch.clone)
        if func is aten._to_copy.default and kwargs.get("dtype", weight.dtype) == weight.dtype:
            device = kwargs.get("device", weight.device)
            return weight.with_inner(lambda t: t.to(device))
        raise NotImplementedError(f"{cls.__name__} stores GGUF blocks and does not support {func}: "
                                  "dequantize() it first (sparseft.quantize.dequantized)")


def rest_given(args, kwargs) -> bool:
    """Whether F.embedding was asked for anything but a plain lookup (padding_idx alone only changes grads)."""
    names = ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
    given = dict(zip(names, args)) | kwargs
    plain = {"padding_idx": given.get("padding_idx"), "max_norm": None, "norm_type": 2.0,
             "scale_grad_by_freq": False, "sparse": False}
    return any(given.get(name, plain[name]) != plain[name] for name in names[1:])


def dense(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.dequantize() if isinstance(t, BlockTensor) else t


class Q4_1Tensor(BlockTensor):
    """4-bit codes (two per byte) with an fp16 scale and minimum per block of 32: w = code · scale + min."""

    inner_names = ("codes", "scales", "mins")

    def block_values(self) -> torch.Tensor:
        codes = torch.stack((self.codes & 15, self.codes >> 4), dim=-1).reshape(-1, BLOCK).float()
        return codes * self.scales.float()[:, None] + self.mins.float()[:, None]


class Q8_0Tensor(BlockTensor):
    """int8 codes with an fp16 scale per block of 32: w = code · scale."""

    inner_names = ("codes", "scales")

    def block_values(self) -> torch.Tensor:
        return self.codes.reshape(-1, BLOCK).float() * self.scales.float()[:, None]


def blocks_of(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as fp32 blocks of 32 along its rows (the last dimension must divide by 32)."""
    if weight.shape[-1] % BLOCK:
        raise ValueError(f"rows of {weight.shape[-1]} weights do not split into blocks of {BLOCK}")
    return weight.detach().float().reshape(-1, BLOCK)


def quantize_q4_1(weight: torch.Tensor) -> Q4_1Tensor:
    """``weight`` in Q4_1 blocks. As ggml's reference quantizer: scale = (max − min) / 15 per block and
    code = round((w − min) / scale), from the unrounded scale and minimum; both are then stored in fp16.
    A block that was itself dequantized from Q4_1 spans codes 0 … 15, so it gets its codes, scale and
    minimum back and dequantizes to the same numbers."""
    blocks = blocks_of(weight)
    low, high = blocks.min(dim=1).values, blocks.max(dim=1).values
    scale = (high - low) / 15
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    codes = ((blocks - low[:, None]) * inverse[:, None]).round().clamp(0, 15).to(torch.uint8).reshape(-1, 2)
    packed = codes[:, 0] | (codes[:, 1] << 4)
    inner = {"codes": packed, "scales": scale.to(torch.float16), "mins": low.to(torch.float16)}
    return Q4_1Tensor(inner, weight.shape, weight.dtype)


def quantize_q8_0(weight: torch.Tensor) -> Q8_0Tensor:
    """``weight`` in Q8_0 blocks: scale = max |w| / 127 per block, code = round(w / scale), the scale
    stored in fp16. A block dequantized from Q8_0 comes back exactly (its largest |code| is 127)."""
    blocks = blocks_of(weight)
    scale = blocks.abs().max(dim=1).values / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    codes = (blocks * inverse[:, None]).round().clamp(-127, 127).to(torch.int8).reshape(-1)
    return Q8_0Tensor({"codes": codes, "scales": scale.to(torch.float16)}, weight.shape, weight.dtype)
