"""Tiny random-init Llama models, built in fixtures: no network, no downloads, CPU only."""

from __future__ import annotations

import os

import torch

# Triton fixes interpreter mode when first imported (transformers imports it below); without CUDA its
# kernels can only run interpreted, which is how tests/test_kernels.py checks the GPU kernel on CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_llama_config(**overrides) -> LlamaConfig:
    cfg = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def make_tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    model.eval()
    return model


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def tiny_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 12), generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny model saved as an HF directory (what `--model DIR` takes)."""
    path = tmp_path / "tiny-base"
    make_tiny_llama().save_pretrained(path)
    return path


# ---------------------------------------------------------------- a tiny offline tokenizer

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def make_tiny_tokenizer():
    """A character-level tokenizer over printable ASCII (101 ids, fits the tiny model's vocab of 128),
    with <pad>/<s>/</s>/<unk> and a simple chat template. Built in memory: no download."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_model_with_tokenizer_dir(tiny_model_dir):
    """``tiny_model_dir`` with the tiny tokenizer saved next to the weights (what `--model DIR` needs to train)."""
    make_tiny_tokenizer().save_pretrained(tiny_model_dir)
    return tiny_model_dir
