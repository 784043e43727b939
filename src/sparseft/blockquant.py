"""Weights stored in llama.cpp's GGUF block formats, as tensors: ``Q4_1Tensor`` and ``Q8_0Tensor``.

Each run of 32 consecutive weights of a row is one block. Q4_1 keeps a 4-bit code per weight (two
per byte) and an fp16 scale and minimum per block, w = code · scale + min (5 bits a weight); Q8_0
keeps an int8 code per weight and an fp16 scale per block, w = code · scale (8.5 bits a weight).
The bytes are GGUF's, block for block (the ``gguf`` package quantizes); dequantizing is done here in
torch, so it runs on any device and inside the forward.

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
    """A frozen weight stored as GGUF blocks (``blocks``: their bytes, uint8, in the file's order);
    subclasses say how a block's bytes become numbers."""

    gguf_type = ""  # the GGMLQuantizationType
    block_bytes = 0

    @staticmethod
    def __new__(cls, blocks: torch.Tensor, shape: torch.Size, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=blocks.device, requires_grad=False)

    def __init__(self, blocks: torch.Tensor, shape: torch.Size, dtype: torch.dtype):
        self.blocks = blocks

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype})"

    def __tensor_flatten__(self):
        return ["blocks"], (self.shape, self.dtype)

    @classmethod
    def __tensor_unflatten__(cls, inner, meta, outer_size, outer_stride):
        shape, dtype = meta
        return cls(inner["blocks"], shape, dtype)

    def with_blocks(self, blocks: torch.Tensor) -> BlockTensor:
        return type(self)(blocks, self.shape, self.dtype)

    def dequantize(self) -> torch.Tensor:
        """The dense weight, in the dtype it was quantized from."""
        return self.block_values(self.blocks.reshape(-1, self.block_bytes)).reshape(self.shape).to(self.dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of the dense weight (an embedding lookup), dequantizing only those."""
        picked = self.blocks.reshape(self.shape[0], -1)[index.reshape(-1)]
        values = self.block_values(picked.reshape(-1, self.block_bytes))
        return values.reshape(*index.shape, self.shape[-1]).to(self.dtype)

    @staticmethod
    def block_values(blocks: torch.Tensor) -> torch.Tensor:
        """fp32 numbers, one row of 32 per block, of ``blocks`` (one block's bytes per row)."""
        raise NotImplementedError

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return F.linear(*(dense(a) for a in args), **{name: dense(a) for name, a in kwargs.items()})
        if func is F.embedding:
            index, weight, *options = args
            if not plain_lookup(options, kwargs):
                raise NotImplementedError(f"{cls.__name__}: F.embedding with {'/'.join(LOOKUP_DEFAULTS)} set")
            return weight.rows(index)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        weight = args[0]
        if func in (aten.detach.default, aten.alias.default):
            return weight.with_blocks(weight.blocks)  # frozen bytes: a view needs no copy
        if func is aten.clone.default:
            return weight.with_blocks(weight.blocks.clone())
        if func is aten._to_copy.default and kwargs.get("dtype", weight.dtype) == weight.dtype:
            return weight.with_blocks(weight.blocks.to(kwargs.get("device", weight.device)))
        raise NotImplementedError(f"{cls.__name__} stores GGUF blocks and does not support {func}: "
                                  "dequantize() it first (sparseft.quantize.dequantized)")


# F.embedding's options after padding_idx (which only changes gradients, and these weights take none)
LOOKUP_DEFAULTS = {"max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False, "sparse": False}


def plain_lookup(options, kwargs) -> bool:
    """Whether F.embedding's options (after index and weight) ask for a plain row lookup."""
    given = dict(zip(("padding_idx", *LOOKUP_DEFAULTS), options)) | kwargs
    return all(given.get(name, default) == default for name, default in LOOKUP_DEFAULTS.items())


def dense(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.dequantize() if isinstance(t, BlockTensor) else t


class Q4_1Tensor(BlockTensor):
    """GGUF's ``block_q4_1``, 20 bytes per 32 weights: fp16 scale, fp16 minimum, then 16 bytes whose low
    nibbles are the codes of weights 0-15 and high nibbles those of 16-31; w = code · scale + min."""

    gguf_type, block_bytes = "Q4_1", 20

    @staticmethod
    def block_values(blocks: torch.Tensor) -> torch.Tensor:
        scale, low, packed = fp16_at(blocks, 0), fp16_at(blocks, 2), blocks[:, 4:]
        return torch.cat((packed & 15, packed >> 4), dim=1).float() * scale + low


class Q8_0Tensor(BlockTensor):
    """GGUF's ``block_q8_0``, 34 bytes per 32 weights: fp16 scale, then 32 int8 codes; w = code · scale."""

    gguf_type, block_bytes = "Q8_0", 34

    @staticmethod
    def block_values(blocks: torch.Tensor) -> torch.Tensor:
        return blocks[:, 2:].view(torch.int8).float() * fp16_at(blocks, 0)


def fp16_at(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 number at byte ``offset`` of every block (GGUF is little-endian), as an fp32 column."""
    return blocks[:, offset:offset + 2].contiguous().view(torch.float16).float()


def quantize_as(cls: type[BlockTensor], weight: torch.Tensor) -> BlockTensor:
    """``weight`` in ``cls``'s GGUF blocks, quantized by the ``gguf`` package (llama.cpp's reference
    quantizer in numpy), so the bytes are those a GGUF file of that type holds."""
    from gguf import GGMLQuantizationType, quants

    if weight.shape[-1] % BLOCK:
        raise ValueError(f"rows of {weight.shape[-1]} weights do not split into blocks of {BLOCK}")
    dense = weight.detach().float().cpu().numpy()
    raw = quants.quantize(dense, GGMLQuantizationType[cls.gguf_type])
    return cls(torch.from_numpy(raw).reshape(-1).to(weight.device), weight.shape, weight.dtype)


def quantize_q4_1(weight: torch.Tensor) -> Q4_1Tensor:
    """``weight`` in Q4_1 blocks: per block scale = (max − min) / 15 and code = round((w − min) / scale).
    A block that was itself dequantized from Q4_1 spans codes 0 … 15, so it gets its codes, scale and
    minimum back and dequantizes to the same numbers."""
    return quantize_as(Q4_1Tensor, weight)


def quantize_q8_0(weight: torch.Tensor) -> Q8_0Tensor:
    """``weight`` in Q8_0 blocks: per block scale = max |w| / 127 and code = round(w / scale). A block
    dequantized from Q8_0 comes back exactly (its largest |code| is 127)."""
    return quantize_as(Q8_0Tensor, weight)
