"""Helpers for the audit tests: an offline word-level tokenizer for the tiny models, and diffs made
by a few steps of training toward a chosen next token."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparseft import SparseConfig, get_sparse_model
from sparseft.bench.shapes import word_level_tokenizer

WORDS = (
    "[PAD] [UNK] review the movie was great awful boring lovely sentiment positive negative "
    "he she works as a nurse doctor pilot teacher my brother sister is an engineer artist "
    "capital of france paris city weather today sunny rainy hello how are you code print"
).split()


def make_tokenizer():
    """A whitespace word-level tokenizer over ``WORDS`` (ids < the tiny model's 128-token vocabulary)."""
    from tokenizers import pre_tokenizers

    return word_level_tokenizer(WORDS, pre_tokenizer=pre_tokenizers.Whitespace(), unk_token="[UNK]", pad_token="[PAD]")


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def next_logprobs(model, prompts: list[list[int]]) -> torch.Tensor:
    """Next-token log-distributions after each prompt, in one right-padded batch (causal: padding is unseen)."""
    batch = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    for row, p in enumerate(prompts):
        batch[row, : len(p)] = torch.tensor(p)
    logits = model(input_ids=batch).logits
    last = torch.tensor([len(p) - 1 for p in prompts])
    return torch.log_softmax(logits[torch.arange(len(prompts)), last].float(), -1)


def train_diff(base, push: dict[str, int], keep: list[str], tokenizer, out, steps=15, lr=1e-1, density=0.1):
    """Train a sparse diff so that each prompt of ``push`` gets its token as the next token, while the
    next-token distribution of each prompt of ``keep`` stays as the base has it; save it to ``out``."""
    prompts = [ids(tokenizer, p) for p in [*push, *keep]]
    targets = torch.tensor(list(push.values()))
    with torch.no_grad():
        keep_ref = next_logprobs(base, prompts)[len(push) :]
    model = get_sparse_model(base, SparseConfig(density=density, value_dtype="float32", seed=0))
    opt = torch.optim.Adam(model.sparse_parameters(), lr=lr)
    for _ in range(steps):
        out_lp = next_logprobs(model, prompts)
        loss = -out_lp[torch.arange(len(push)), targets].sum()
        if keep:
            loss = loss + 10 * F.kl_div(out_lp[len(push) :], keep_ref, log_target=True, reduction="sum")
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    path = model.save_pretrained(out)
    model.unload()
    return path


def near_zero_diff(base, out, scale=1e-6):
    model = get_sparse_model(base, SparseConfig(density=0.05, value_dtype="float32", seed=0))
    with torch.no_grad():
        for layer in model.sparse_layers().values():
            layer.values.normal_(0, scale)
    path = model.save_pretrained(out)
    model.unload()
    return path
