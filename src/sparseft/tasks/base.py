"""What every task shares: turning an example into a prompt and a target, for evaluation and training alike.

A task's prompt is written once (``Task.instruction``); ``render_prompt`` wraps it in the chat template
of an instruct model when the tokenizer has one. ``Task.training_rows`` and ``Task.evaluate`` both go
through these two functions, so a model is trained on exactly the text it is later scored on.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ..loading import prompt_prefix

Record = dict[str, Any]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, instruction: str) -> str:
    """The text a model sees before its answer: the chat template's user turn when there is one."""
    if tokenizer is not None and has_chat_template(tokenizer):
        messages = [{"role": "user", "content": instruction}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # A base model without a chat template: a plain "Answer:" cue; the target then starts with a space.
    return f"{instruction}\nAnswer:"


def completion_text(tokenizer, target: str) -> str:
    """What follows the prompt: the target and the end-of-answer token, so generation learns to stop."""
    eos = (getattr(tokenizer, "eos_token", None) or "") if tokenizer is not None else ""
    if tokenizer is not None and has_chat_template(tokenizer):
        return f"{target}{eos}"
    return f" {target}{eos}"






def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt: its text after ``loading.prompt_prefix``."""
    return prompt_prefix(tokenizer, text) + tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_completion(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class RowSplit:
    """A deterministic hold-out of one data file: record i is held out when ``i % every == 0``.

    ``part="fit"`` keeps the other records (to train on), ``part="validation"`` the held-out ones (to
    choose learning rates on); the two parts of a file never share a record. Spread through the file,
    so both parts see its whole range, also in a small file.
    """

    every: int
    part: str  # "fit" or "validation"

    def __post_init__(self) -> None:
        if self.every < 2 or self.part not in ("fit", "validation"):
            raise ValueError(f"RowSplit needs every >= 2 and part 'fit' or 'validation', got {self}")

    def apply(self, records: list) -> list:
        held_out = self.part == "validation"
        return [r for i, r in enumerate(records) if (i % self.every == 0) == held_out]


class Task(ABC):
    """A prompt format + a data loader + a metric.

    Subclasses set ``name`` and ``family`` and implement ``load``, ``instruction``, ``target`` and
    ``evaluate``. ``training_rows`` then comes for free and matches ``evaluate``'s prompts.
    """

    name: str
    family: str
    primary_metric: str | None = None  # the headline metric of reports; None: the first one evaluate returns

    @abstractmethod
    def load(self, path: str | os.PathLike, limit: int | None = None) -> list[Record]:
        """Examples from a data file (validated: a bad row raises ``DataFormatError`` naming it)."""

    @abstractmethod
    def instruction(self, record: Record) -> str:
        """The task text for one example, before any chat template."""

    @abstractmethod
    def target(self, record: Record) -> str:
        """The answer a fine-tuned model should give (the training completion)."""

    @abstractmethod
    def evaluate(self, model, tokenizer, records: list[Record], batch_size: int = 8, progress: bool = True) -> dict:
        """Metrics (fractions in [0, 1]) of ``model`` on ``records``."""

    def evaluate_detailed(
        self, model, tokenizer, records: list[Record], batch_size: int = 8, progress: bool = True
    ) -> tuple[dict, dict[str, list[float]]]:
        """``(metrics, per-example scores)``: the metrics of ``evaluate`` and, for each metric that is a
        mean over examples, every example's own score (in record order), for paired comparisons.
        Tasks that do not score examples one by one return no per-example scores."""
        return self.evaluate(model, tokenizer, records, batch_size=batch_size, progress=progress), {}

    def prompt(self, tokenizer, record: Record) -> str:
        return render_prompt(tokenizer, self.instruction(record))

    def training_rows(
        self, path: str | os.PathLike, limit: int | None = None, tokenizer=None
    ) -> list[dict[str, str]]:
        """``{"prompt", "completion"}`` rows for ``sparseft train``, in the exact format ``evaluate`` uses.

        Pass the tokenizer of the model to be trained: with a chat template the prompt is rendered
        through it (as evaluation does) and the completion ends with its end-of-turn token.

        Example:
            >>> rows = get_task("routing").training_rows(ROUTING_DATA / "train.jsonl", tokenizer=tok)  # doctest: +SKIP
        """
        return [
            {"prompt": self.prompt(tokenizer, r), "completion": completion_text(tokenizer, self.target(r))}
            for r in self.load(path, limit)
        ]
