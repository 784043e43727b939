"""Behaviour drift: how a diff moves the model's next-token predictions on a probe set.

Everything here works on token ids. One pass of a model over the probes gives, per prompt (and per
pair member), the log-distribution of the next token and the log-probability of the probe's target
continuation. Comparing the base pass with the fine-tuned pass gives:

- KL(base ‖ fine-tuned) of the next-token distribution, per prompt (mean and max over the set);
- top-1 agreement: the share of prompts whose most likely next token is unchanged;
- pair drift: for a pair (A, B) differing in one attribute, the gap log p(target | A) − log p(target | B)
  after minus before. A diff that treats the two members differently moves this gap; a diff that
  changes both alike does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .probes import Probe


@dataclass
class Pass:
    """One model's outputs on a probe set.

    ``next_logprobs[i]`` is the next-token log-distribution after sequence i and ``target_logprob[i]``
    the summed log-probability of its target (0 when none). Sequences are the probes' prompts in
    order, followed by the pair members of the probes that have one (see ``sequence_plan``).
    """

    next_logprobs: torch.Tensor
    target_logprob: torch.Tensor


def sequence_plan(probes: list[Probe]) -> list[tuple[int, str, list[int], list[int]]]:
    """``(probe index, member, prompt ids, target ids)`` for every sequence a pass evaluates."""
    plan = [(i, "prompt", p.prompt, p.target or []) for i, p in enumerate(probes)]
    plan += [(i, "pair", p.pair, p.target or []) for i, p in enumerate(probes) if p.pair is not None]
    return plan


@torch.no_grad()
def run_pass(model: nn.Module, probes: list[Probe], batch_size: int = 8) -> Pass:
    """Evaluate ``model`` on every sequence of ``sequence_plan(probes)`` in right-padded batches.

    No attention mask is needed: with causal attention a token never sees the padding after it.
    """
    plan = sequence_plan(probes)
    device = next(model.parameters()).device
    next_rows, target_rows = [], []
    for start in range(0, len(plan), batch_size):
        chunk = plan[start : start + batch_size]
        seqs = [prompt + target for _, _, prompt, target in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq)
        logprobs = torch.log_softmax(model(input_ids=ids.to(device)).logits.float(), dim=-1).cpu()
        for row, (_, _, prompt, target) in enumerate(chunk):
            next_rows.append(logprobs[row, len(prompt) - 1])
            positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(target))
            target_rows.append(logprobs[row, positions, torch.tensor(target, dtype=torch.long)].sum())
    return Pass(torch.stack(next_rows), torch.stack(target_rows))


def kl_divergence(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row, from log-probabilities, in float64 (clamped at 0 against rounding)."""
    p_log, q_log = p_log.double(), q_log.double()
    return (p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0.0)


def js_divergence(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence per row (symmetric, bounded by ln 2)."""
    m_log = torch.logsumexp(torch.stack([p_log.double(), q_log.double()]), dim=0) - torch.log(torch.tensor(2.0))
    return 0.5 * (kl_divergence(p_log, m_log) + kl_divergence(q_log, m_log))


def prompt_rows(probes: list[Probe], base: Pass, tuned: Pass) -> list[dict]:
    """Per evaluated sequence: KL(base ‖ tuned), top-1 token of each model, agreement."""
    kl = kl_divergence(base.next_logprobs, tuned.next_logprobs)
    top_base, top_tuned = base.next_logprobs.argmax(-1), tuned.next_logprobs.argmax(-1)
    rows = []
    for s, (i, member, _, _) in enumerate(sequence_plan(probes)):
        rows.append({
            "probe": probes[i].id,
            "member": member,
            "text": probes[i].text.get(member, ""),
            "kl": float(kl[s]),
            "top1_base": int(top_base[s]),
            "top1_tuned": int(top_tuned[s]),
            "agree": bool(top_base[s] == top_tuned[s]),
        })
    return rows


def pair_gap(run: Pass, a: int, b: int, token: int | None) -> float:
    """log p(target | A) − log p(target | B); ``token`` is the single-token target when none was given."""
    if token is None:
        return float(run.target_logprob[a] - run.target_logprob[b])
    return float(run.next_logprobs[a, token] - run.next_logprobs[b, token])


def pair_rows(probes: list[Probe], base: Pass, tuned: Pass) -> list[dict]:
    """Per probe with a pair: the log-prob gap of its target between the members, before and after."""
    plan = sequence_plan(probes)
    pair_seq = {i: s for s, (i, member, _, _) in enumerate(plan) if member == "pair"}
    rows = []
    for i, probe in enumerate(probes):
        if probe.pair is None:
            continue
        a, b = i, pair_seq[i]  # prompts come first in the plan, in probe order
        token = None if probe.target else int(base.next_logprobs[a].argmax())
        before, after = pair_gap(base, a, b, token), pair_gap(tuned, a, b, token)
        js_before = float(js_divergence(base.next_logprobs[a], base.next_logprobs[b]))
        js_after = float(js_divergence(tuned.next_logprobs[a], tuned.next_logprobs[b]))
        rows.append({
            "probe": probe.id,
            "category": probe.category,
            "prompt": probe.text.get("prompt", ""),
            "pair": probe.text.get("pair", ""),
            "target": probe.text.get("target", ""),
            "target_source": "given" if probe.target else "base top-1",
            "target_token": token,
            "gap_before": before,
            "gap_after": after,
            "drift": after - before,
            "js_before": js_before,
            "js_after": js_after,
        })
    return rows
