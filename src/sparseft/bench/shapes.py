"""Named random-init Llama shapes and tiny offline tokenizers: the one place benchmarks and tests get a model.

A shape is a handful of ``LlamaConfig`` values (sizes only: no weights, no download). ``build_llama``
turns a shape name into a seeded random-init ``LlamaForCausalLM``; ``word_level_tokenizer`` builds
a tokenizer in memory from a vocabulary list, so no test or benchmark needs the network.

    >>> from sparseft.bench.shapes import build_llama
    >>> model = build_llama("tiny", seed=0)
    >>> model.config.hidden_size, model.config.num_hidden_layers
    (32, 2)
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..errors import ConfigError

SHAPES: dict[str, dict[str, Any]] = {
    # The tests' model (27k parameters); also the CI benchmark grid's, with the vocabulary its texts need.
    "tiny": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False),
    # 4 layers, hidden 256 (4.0M parameters): CPU timings of serving and re-selection in seconds.
    "small": dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False),
    # The sizes of real models, with random weights.
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True),
    "3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True),
    # Published configs of larger Llamas, for the GPU fit probe (``bench.gpu_fit``): never built whole on a CPU.
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,  # Llama 3 8B
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=False),
    "13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,  # Llama 2 13B
                num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=2048, tie_word_embeddings=False),
    "34b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=22016, num_hidden_layers=48,  # Code Llama 34B
                num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=False),
    "65b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,  # LLaMA 65B (QLoRA's)
                num_attention_heads=64, num_key_value_heads=64, max_position_embeddings=2048, tie_word_embeddings=False),
    "70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,  # Llama 3 70B
                num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=False),
    "405b": dict(vocab_size=128256, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,  # Llama 3.1 405B
                 num_attention_heads=128, num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=False),
}


def parameter_count(shape: str | dict[str, Any]) -> int:
    """Parameters of ``shape`` (a name in ``SHAPES``, or its values) from its config alone (nothing built)."""
    c = SHAPES[shape] if isinstance(shape, str) else shape
    h, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    norms = (2 * layers + 1) * h
    embeddings = vocab * h * (1 if c["tie_word_embeddings"] else 2)  # input embeddings, and the head unless tied
    return layers * linear_params_per_layer(c) + norms + embeddings


def linear_params_per_layer(shape: str | dict[str, Any]) -> int:
    c = SHAPES[shape] if isinstance(shape, str) else shape
    h, inter = c["hidden_size"], c["intermediate_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    return 2 * h * h + 2 * kv * h + 3 * h * inter


def llama_config(shape: str = "tiny", min_positions: int = 0, **overrides: Any):
    """The ``LlamaConfig`` of ``shape`` with ``overrides`` on top, with room for at least ``min_positions`` tokens."""
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ConfigError(f"model shape {shape!r}: expected one of {sorted(SHAPES)}")
    values = {**SHAPES[shape], **overrides}
    values["max_position_embeddings"] = max(values["max_position_embeddings"], min_positions)
    return LlamaConfig(**values)


def build_llama(shape: str = "tiny", seed: int = 0, *, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None, min_positions: int = 0, **overrides: Any):
    """A random-init ``LlamaForCausalLM`` of ``shape`` (``overrides`` on top), seeded, in eval mode.

    With ``dtype`` / ``device`` the weights are created there directly (a 3B model never exists in
    fp32 on the CPU first). The same shape, overrides and seed give the same weights every time.
    """
    from transformers import LlamaForCausalLM

    config = llama_config(shape, min_positions, **overrides)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or previous)
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


# ---------------------------------------------------------------- tiny offline tokenizers


def word_level_tokenizer(vocab: Sequence[str], *, pre_tokenizer=None, decoder=None, chat_template: str | None = None,
                         **special_tokens: Any):
    """A fast tokenizer that maps each entry of ``vocab`` to its position, built in memory.

    ``pre_tokenizer`` / ``decoder`` are ``tokenizers`` objects (default: split on whitespace, no decoder);
    ``special_tokens`` are ``PreTrainedTokenizerFast`` keywords (``unk_token="<unk>"``, ``pad_token`` ...).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = {word: i for i, word in enumerate(vocab)}
    backend = Tokenizer(models.WordLevel(ids, unk_token=special_tokens.get("unk_token")))
    backend.pre_tokenizer = pre_tokenizer or pre_tokenizers.WhitespaceSplit()
    if decoder is not None:
        backend.decoder = decoder
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def numbered_vocab(words: Sequence[str], size: int) -> list[str]:
    """``words`` then ``w<id>`` up to ``size`` entries: every id of a ``size``-token model decodes to a word."""
    return [*words, *(f"w{i}" for i in range(len(words), size))]


# ---------------------------------------------------------------- the benchmark grid's tiny model

TEXT_SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
# A ChatML-style template like SmolLM2's, so tasks that render chat messages work on the tiny model too.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORD = re.compile(r"\w+|[^\w\s]")


def words_of(texts: Iterable[str]) -> list[str]:
    """Distinct words and punctuation marks of ``texts`` in first-seen order."""
    seen: dict[str, None] = {}
    for text in texts:
        for w in WORD.findall(text):
            seen.setdefault(w, None)
    return list(seen)


def text_tokenizer(texts: Iterable[str]):
    """A word-level tokenizer whose vocabulary is the words of ``texts`` (plus specials).

    The real tokenizer would give a 49k-entry embedding; a vocabulary made from the benchmark's own
    text keeps the model at a few thousand parameters while every word the task uses (prompt and label
    words included) stays a distinct token, so metrics are computed exactly as for a real model.
    """
    from tokenizers import decoders, pre_tokenizers

    vocab = list(dict.fromkeys([*TEXT_SPECIAL_TOKENS, *words_of(texts)]))
    return word_level_tokenizer(
        vocab, pre_tokenizer=pre_tokenizers.Whitespace(),
        decoder=decoders.WordPiece(prefix="##"),  # joins words with spaces
        chat_template=CHATML_TEMPLATE, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=TEXT_SPECIAL_TOKENS[4:],
    )


def build_tiny_model_dir(out: str | Path, texts: Iterable[str], shape: dict[str, Any] | None = None,
                         seed: int = 0) -> Path:
    """Write a ``tiny`` random Llama (``shape`` on top) and a tokenizer covering ``texts`` to ``out``; returns it."""
    from ..loading import save_model_dir

    tokenizer = text_tokenizer(texts)
    model = build_llama(
        "tiny", seed, **{"max_position_embeddings": 512, **(shape or {})}, vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return save_model_dir(model, tokenizer, out)
