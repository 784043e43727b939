"""Tiny random-init Llama models, built in fixtures: no network, no downloads, CPU only."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import torch

# Tests write no caches of the user's: converted models, the HF hub and datasets caches go to a temporary
# directory. Set here, at import, because huggingface_hub and datasets read these variables when imported.
# The real-model tests (marker real_model) keep reading the user's converted SmolLM2 (see use_real_model_cache).
USER_SPARSEFT_CACHE = os.environ.get("SPARSEFT_CACHE") or str(
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparseft"
)
TEST_CACHE = Path(tempfile.mkdtemp(prefix="sparseft-test-cache-"))
atexit.register(shutil.rmtree, TEST_CACHE, ignore_errors=True)  # also after --collect-only or a failed session
for variable, folder in (("SPARSEFT_CACHE", "sparseft"), ("HF_HOME", "hf"), ("HF_DATASETS_CACHE", "datasets")):
    os.environ[variable] = str(TEST_CACHE / folder)

# Triton fixes interpreter mode when first imported (transformers imports it below); without CUDA its
# kernels can only run interpreted, which is how tests/test_kernels.py checks the GPU kernel on CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from tokenizers import Regex, decoders, pre_tokenizers  # noqa: E402

from sparseft.bench.shapes import build_llama, word_level_tokenizer  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def temporary_caches():
    """Every test runs with the caches under TEST_CACHE, removed when the session ends."""
    yield TEST_CACHE
    shutil.rmtree(TEST_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def use_real_model_cache(request, monkeypatch):
    """A real_model test reads the converted SmolLM2 from the user's cache (converting it there once)."""
    if request.node.get_closest_marker("real_model"):
        monkeypatch.setenv("SPARSEFT_CACHE", USER_SPARSEFT_CACHE)


def make_tiny_llama(seed: int = 0, **overrides):
    """The ``tiny`` shape (vocab 128, hidden 32, 2 layers), random init from ``seed``, in eval mode."""
    return build_llama("tiny", seed, **overrides)


@pytest.fixture
def tiny_model():
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

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    return word_level_tokenizer(
        specials + chars, pre_tokenizer=pre_tokenizers.Split(Regex("."), behavior="isolated"), decoder=decoders.Fuse(),
        chat_template=TINY_CHAT_TEMPLATE, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_model_with_tokenizer_dir(tiny_model_dir):
    """``tiny_model_dir`` with the tiny tokenizer saved next to the weights (what `--model DIR` needs to train)."""
    make_tiny_tokenizer().save_pretrained(tiny_model_dir)
    return tiny_model_dir
