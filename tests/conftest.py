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
