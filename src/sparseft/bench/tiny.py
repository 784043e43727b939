"""A tiny random-init Llama with a word-level tokenizer, built on the fly for CI-sized benchmarks.

The real tokenizer would give a 49k-entry embedding; a vocabulary made from the benchmark's own
text keeps the model at a few thousand parameters while every word the task uses (prompt and label
words included) stays a distinct token, so metrics are computed exactly as for a real model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import torch

SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
# A ChatML-style template like SmolLM2's, so tasks that render chat messages work on the tiny model too.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_SHAPE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
WORD = re.compile(r"\w+|[^\w\s]")


def words_of(texts: Iterable[str]) -> list[str]:
    """Distinct words and punctuation marks of ``texts`` in first-seen order."""
    seen: dict[str, None] = {}
    for text in texts:
        for w in WORD.findall(text):
            seen.setdefault(w, None)
    return list(seen)


def build_tokenizer(texts: Iterable[str]):
    """A fast word-level tokenizer whose vocabulary is the words of ``texts`` (plus specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words_of(texts):
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model_dir(out: str | Path, texts: Iterable[str], shape: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """Write a tiny random Llama + tokenizer covering ``texts`` to ``out``; returns the folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..loading import save_model_dir

    tokenizer = build_tokenizer(texts)
    cfg = LlamaConfig(
        **{**DEFAULT_SHAPE, **(shape or {})},
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    return save_model_dir(model, tokenizer, out)
