"""Scoring a diff with EleutherAI's lm-evaluation-harness (``pip install 'sparseft[lmeval]'``).

Importing this module registers the lm_eval model type ``sparseft``: the harness's own Hugging Face
model (``HFLM``) with a diff merged into the base in memory, so any harness task scores base + diff
without a merged copy on disk. ``diff`` is a diff directory or a Hub id (``org/name``).

    import lm_eval, sparseft.lmeval
    lm_eval.simple_evaluate(model="sparseft", model_args="pretrained=BASE,diff=DIFF", tasks=["sst2"])

From the shell, ``python -m sparseft.lmeval`` is the ``lm_eval`` command with ``sparseft`` registered:

    python -m sparseft.lmeval --model sparseft --model_args pretrained=BASE,diff=DIFF --tasks sst2

Without this module, export the diff as a PEFT adapter and use the harness's ``peft`` argument:
``sparseft export --to peft DIFF ADAPTER`` then ``lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER``.
"""

from __future__ import annotations

import os

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..model import SparseModel


@register_model("sparseft")
class SparseFTLM(HFLM):
    """``HFLM`` whose model is ``pretrained`` with the sparse diff ``diff`` merged in (exactly, in memory).

    Every other argument is ``HFLM``'s (``dtype``, ``batch_size``, ``device``, ...).

    Example:
        >>> lm = SparseFTLM(pretrained="HuggingFaceTB/SmolLM2-135M", diff="runs/sst2")  # doctest: +SKIP
    """

    def __init__(self, pretrained, diff: str | os.PathLike | None = None, **kwargs) -> None:
        self.sparse_diff = diff
        super().__init__(pretrained=pretrained, **kwargs)
        if not isinstance(pretrained, str) and diff is not None:  # a model object: HFLM did not create it
            self._model = merge_diff(self._model, diff)

    def _create_model(self, *args, **kwargs) -> None:
        super()._create_model(*args, **kwargs)
        if self.sparse_diff is not None:
            self._model = merge_diff(self._model, self.sparse_diff)


def merge_diff(model, diff: str | os.PathLike):
    """``model`` with ``diff`` merged into its weights; validated first (a diff of another base is refused)."""
    return SparseModel.from_pretrained(model, diff).merge_and_unload()
