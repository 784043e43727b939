"""Shared pieces of the serving tests: a tiny model directory with its own offline tokenizer, diffs over it,
offline references computed with SparseModel, and a uvicorn server on a loopback port in a thread."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch
import uvicorn
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from conftest import make_tiny_llama
from sparseft import SparseConfig, SparseModel, get_sparse_model
from sparseft.bench.shapes import numbered_vocab, word_level_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def make_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny model's 128 ids: <unk>, <s>, </s>, chat words, then w7..w127."""
    vocab = numbered_vocab(["<unk>", "<s>", "</s>", "user", "assistant", "system", ":"], vocab_size)
    return word_level_tokenizer(vocab, chat_template=CHAT_TEMPLATE,
                                unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_base(path: Path, seed: int = 0) -> Path:
    make_tiny_llama(seed).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def make_diff(path: Path, seed: int, base_seed: int = 0, scale: float = 0.3, value_dtype: str = "bfloat16") -> Path:
    """A diff over the tiny base with large random values, so its greedy output differs from the base's."""
    config = SparseConfig(density=0.2, scorer="random", seed=seed, value_dtype=value_dtype)
    sparse = get_sparse_model(make_tiny_llama(base_seed), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for values in sparse.sparse_parameters():
            values.copy_(torch.randn(values.shape, generator=gen) * scale)
    return sparse.save_pretrained(path)


def reference(model_dir: Path, diff_dir: Path | None, prompt_ids: list[int], max_tokens: int) -> str:
    """What SparseModel gives offline (greedy) for this diff, or the plain base when ``diff_dir`` is None."""
    model = make_tiny_llama()
    if diff_dir is not None:
        model = SparseModel.from_pretrained(model, diff_dir)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    return AutoTokenizer.from_pretrained(model_dir).decode(out[0, len(prompt_ids):], skip_special_tokens=True)


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 at a free port, in a daemon thread."""

    def __init__(self, app):
        self.app = app
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()
