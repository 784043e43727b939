"""Batched inference for evaluation: log-likelihood of fixed completions, and greedy generation.

Both left-pad prompts and pass explicit position ids, so a padded prompt is seen exactly as the
unpadded one would be (up to float rounding of the batched matmuls).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..config import positive_count
from ..loading import pad_token_id

# transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns); support both.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices of the prompts, ``batch_size`` at a time, longest prompts first: a batch pads to its
    longest prompt, so grouping similar lengths spends less compute on padding (and the first batch
    shows at once whether the longest fit). Callers put each result back at its index."""
    batch_size = positive_count("batch_size", batch_size)  # 0 would stop range(), a negative one score nothing
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: equal lengths keep their order
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` with every sequence right-aligned."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def score_completions(
    model,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """``[len(prompts), len(completions)]``: Σ log p(completion tokens | prompt) for every pair.

    Each prompt is run once; its key/value cache is repeated for every completion, so scoring L
    candidate labels costs one prompt pass plus L short continuations rather than L full passes.

    Example:
        >>> scores = score_completions(model, [[5, 6, 7]], [[1], [2, 3]])  # doctest: +SKIP
        >>> scores.shape
        torch.Size([1, 2])
    """
    if any(len(c) == 0 for c in completions) or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt and completion needs at least one token")
    device = model_device(model)
    n_labels = len(completions)
    comp_ids, comp_mask = right_pad(completions, pad_id)
    comp_ids, comp_mask = comp_ids.to(device), comp_mask.to(device)
    scores = torch.empty(len(prompts), n_labels)
    for rows in tqdm(list(batches([len(p) for p in prompts], batch_size)), desc="scoring", disable=not progress):
        ids, mask = left_pad([prompts[i] for i in rows], pad_id, device)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,
        )
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]: p(first completion token)
        # token_logp[b, l, j] = log p(completion l, token j | prompt b, tokens < j)
        token_logp = torch.zeros(len(rows), n_labels, comp_ids.shape[1], device=device)
        token_logp[:, :, 0] = first[:, comp_ids[:, 0]]
        if comp_ids.shape[1] > 1:
            token_logp[:, :, 1:] = continuation_logp(model, getattr(out, CACHE_NAME), mask, comp_ids, comp_mask)
        scores[rows] = (token_logp * comp_mask).sum(-1).cpu()
    return scores


def continuation_logp(model, cache, prompt_mask, comp_ids, comp_mask) -> torch.Tensor:
    """log p of completion tokens 1.. given the cached prompt and the completion's own earlier tokens."""
    batch, n_labels = prompt_mask.shape[0], comp_ids.shape[0]
    cache.batch_repeat_interleave(n_labels)  # row b * n_labels + l: prompt b followed by completion l
    fed = comp_ids[:, :-1].repeat(batch, 1)
    fed_mask = comp_mask[:, :-1].repeat(batch, 1)
    prompt_len = prompt_mask.sum(-1).repeat_interleave(n_labels)
    positions = prompt_len[:, None] + torch.arange(fed.shape[1], device=fed.device)[None, :]
    out = model(
        input_ids=fed,
        attention_mask=torch.cat([prompt_mask.repeat_interleave(n_labels, dim=0), fed_mask], dim=1),
        position_ids=positions,
        use_cache=True,
        **{CACHE_NAME: cache},
    )
    logp = torch.log_softmax(out.logits.float(), dim=-1)  # [B*L, C-1, V]
    wanted = comp_ids[:, 1:].repeat(batch, 1)
    picked = logp.gather(-1, wanted[..., None])[..., 0]
    return picked.view(batch, n_labels, -1)


@torch.inference_mode()
def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """Greedy continuations of token-id prompts, decoded without special tokens and stripped."""
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    texts = [""] * len(prompts)
    for rows in tqdm(list(batches([len(p) for p in prompts], batch_size)), desc="generating", disable=not progress):
        ids, mask = left_pad([prompts[i] for i in rows], pad_id, device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = out[:, ids.shape[1] :]
        for i, text in zip(rows, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            texts[i] = text.strip()
    return texts
