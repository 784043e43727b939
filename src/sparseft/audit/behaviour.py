"""``audit``: run the base and the fine-tuned model on a probe set and gate on how far the diff moved it.

Only one copy of the base is held: the base pass runs on the plain model, then the diff is loaded
onto it (validated, fingerprint-checked), merged for the fine-tuned pass, and taken out again, so
the caller's model ends bitwise as it started. Over a quantized base (``quantize_base``) the diff stays
unmerged for that pass (y = base_q(x) + Δ(x)): codes cannot take it, and that is the model it trained as.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..config import positive_count
from ..diffio import check_against_model, read_diff, target_weights
from ..model import SparseModel
from ..quantize import is_quantized
from .drift import pair_rows, prompt_rows, run_pass
from .probes import Probe, default_probe_file, load_probes
from .report import Thresholds, build_report


def vocab_size(model: nn.Module) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def decode_tokens(rows: list[dict], tokenizer) -> None:
    """Add the readable form of each row's top-1 tokens (in place)."""
    if tokenizer is None:
        return
    for row in rows:
        for side in ("top1_base", "top1_tuned"):
            row[f"{side}_text"] = tokenizer.decode([row[side]])


def audit_probes(
    model: nn.Module, diff_path: str | os.PathLike, probes: list[Probe], batch_size: int = 8,
    allow_unverified_base: bool = False,
) -> tuple[list[dict], list[dict]]:
    """Per-prompt and per-pair rows for ``probes`` (token ids), base vs base + diff; ``model`` is restored.
    ``allow_unverified_base`` as for ``SparseModel.from_pretrained``."""
    diff = read_diff(diff_path)  # fail before spending a pass on a diff that does not fit
    check_against_model(diff, target_weights(model, diff.config), where=str(diff_path),
                        allow_unverified_base=allow_unverified_base)
    was_training = model.training
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    model.eval()
    sparse = None
    try:
        base = run_pass(model, probes, batch_size)
        sparse = SparseModel.from_pretrained(model, diff_path, allow_unverified_base=allow_unverified_base)
        if not any(is_quantized(layer.weight) for layer in sparse.sparse_layers().values()):
            sparse.merge()  # the plain forward; over codes the layers add the delta themselves
        tuned = run_pass(model, probes, batch_size)
    finally:
        if sparse is not None:
            sparse.unload()
        # SparseModel froze every parameter; give the caller back what it had.
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])
        model.train(was_training)
    return prompt_rows(probes, base, tuned), pair_rows(probes, base, tuned)


def audit_diff(
    model: nn.Module,
    diff_path: str | os.PathLike,
    probe_file: str | os.PathLike | None = None,
    tokenizer=None,
    thresholds: Thresholds | None = None,
    batch_size: int = 8,
    model_name: str = "",
    allow_unverified_base: bool = False,
) -> dict[str, Any]:
    """The full audit report (see ``report.build_report``); ``report["passed"]`` is the gate's verdict.
    ``allow_unverified_base``: also audit a diff that records no base fingerprint (logged as a warning).

    Example:
        >>> report = audit_diff(base, "my-diff", tokenizer=tok, thresholds=Thresholds(max_kl=0.2))  # doctest: +SKIP
        >>> report["summary"]["top1_agreement"], report["passed"]  # doctest: +SKIP
        (0.97, True)
    """
    batch_size = positive_count("batch_size", batch_size)
    probe_path = Path(probe_file) if probe_file else default_probe_file()
    probes = load_probes(probe_path, vocab_size(model), tokenizer)
    prompts, pairs = audit_probes(model, diff_path, probes, batch_size, allow_unverified_base)
    decode_tokens(prompts, tokenizer)
    meta = {"model": model_name, "diff": str(diff_path), "probe_file": str(probe_path)}
    return build_report(meta, prompts, pairs, thresholds or Thresholds())
