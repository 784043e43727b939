"""Scoring a diff with EleutherAI's lm-evaluation-harness (``pip install 'sparseft[lmeval]'``).

Importing this module registers the lm_eval model type ``sparseft``: the harness's own Hugging Face
model (``HFLM``) with a diff merged into the base in memory, so any harness task scores base + diff
without a merged copy on disk. ``diff`` is a diff directory or a Hub id (``org/name``).

    import lm_eval, sparseft.lmeval
    lm_eval.simple_evaluate(model="sparseft", model_args="pretrained=BASE,diff=DIFF", tasks=["sst2"])

From the shell, ``python -m sparseft.lmeval`` is the ``lm_eval`` command with ``sparseft`` registered:

    python -m sparseft.lmeval --model sparseft --model_args pretrained=BASE,diff=DIFF --tasks sst2

A diff trained over a weight-only quantized base (``sparseft train --quantize nf4``) takes the same
``quantize`` and ``dtype`` as model arguments: the base is quantized as training did and the diff runs
unmerged over the codes (nothing can be merged into them):

    python -m sparseft.lmeval --model sparseft --model_args pretrained=BASE,diff=DIFF,dtype=bfloat16,quantize=nf4 ...

Without this module, export the diff as a PEFT adapter and use the harness's ``peft`` argument:
``sparseft export --to peft DIFF ADAPTER`` then ``lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER``.
"""

from __future__ import annotations

import logging
import os

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..diffio import recorded_skip
from ..errors import ConfigError, FingerprintMismatchError
from ..hub import resolve_diff
from ..model import SparseModel
from ..quantize import check_scheme, quantize_base, require_torchao

log = logging.getLogger(__name__)


@register_model("sparseft")
class SparseFTLM(HFLM):
    """``HFLM`` whose model is ``pretrained`` with the sparse diff ``diff`` merged in (exactly, in memory).

    ``quantize`` (``int8`` / ``int4`` / ``nf4``): quantize the base weight-only first (a model object is
    quantized in place), as the diff's training run did; the diff then runs unmerged over the codes.
    Every other argument is ``HFLM``'s (``dtype``, ``batch_size``, ``device``, ...).

    Example:
        >>> lm = SparseFTLM(pretrained="HuggingFaceTB/SmolLM2-135M", diff="runs/sst2")  # doctest: +SKIP
        >>> lm = SparseFTLM(pretrained=BASE, diff="runs/q4", dtype="bfloat16", quantize="nf4")  # doctest: +SKIP
    """

    def __init__(self, pretrained, diff: str | os.PathLike | None = None, quantize: str | None = None,
                 **kwargs) -> None:
        diff = diff_path(diff)  # before the model loads, as the quantize check
        if diff is None:  # a forgotten diff= would otherwise pass as the fine-tuned score
            log.warning("model_args has no diff=: scoring the base model alone%s",
                        f" (quantized {quantize})" if quantize else "")
        if quantize:
            check_scheme(quantize)
            require_torchao(quantize)
        self.sparse_diff, self.quantize = diff, quantize or None
        super().__init__(pretrained=pretrained, **kwargs)
        if not isinstance(pretrained, str):  # a model object: HFLM did not create it
            self._model = with_diff(self._model, diff, self.quantize)

    def _create_model(self, *args, **kwargs) -> None:
        super()._create_model(*args, **kwargs)
        self._model = with_diff(self._model, self.sparse_diff, self.quantize)


def diff_path(diff):
    """``diff`` when it can name a diff (a path or Hub id, or None for none). lm_eval's model_args turn a value of
    digits, a number or true/false into an int, float or bool, which no path is: refused by name, not a TypeError."""
    if diff is None or isinstance(diff, (str, os.PathLike)):
        return diff
    raise ConfigError(
        f"model_args diff={diff!r}: lm_eval read the value as type {type(diff).__name__}, not a diff directory or Hub id "
        "org/name (it reads digits, numbers and true/false so); write a directory named like that as ./NAME"
    )


def with_diff(model, diff: str | os.PathLike | None, quantize: str | None = None):
    """``model`` (quantized with ``quantize`` first, if given, but for the layers the diff's training run left
    unquantized) with ``diff``: merged into a full-precision base, unmerged over a quantized one (the plain HF
    model, its targeted layers wrapped); validated first."""
    if quantize:
        diff = resolve_diff(diff) if diff is not None else None  # a Hub id: its snapshot records the skip
        model = quantize_base(model, quantize, recorded_skip([diff], quantize))
    if diff is None:
        return model
    if not quantize:
        return merge_diff(model, diff)
    return attach(model, diff).base_model  # the SparseLinear layers live in the HF model itself


def merge_diff(model, diff: str | os.PathLike):
    """``model`` with ``diff`` merged into its weights; validated first (a diff of another base is refused)."""
    return attach(model, diff).merge_and_unload()


def attach(model, diff: str | os.PathLike) -> SparseModel:
    """``SparseModel.from_pretrained``; a refusal that names command-line flags also says where lm_eval
    takes them (a refusal for another base names none: no flag would help)."""
    try:
        return SparseModel.from_pretrained(model, diff)
    except FingerprintMismatchError as e:
        if "--dtype" not in str(e) and "--quantize" not in str(e):
            raise
        raise type(e)(f"{e} (lm_eval takes --dtype / --quantize as model_args dtype=... and quantize=..., e.g. "
                      "--model_args pretrained=BASE,diff=DIFF,dtype=float32,quantize=int8)") from e
