"""What every task shares: turning an example into a prompt and a target, for evaluation and training alike.

A task's prompt is written once (``Task.instruction``); ``render_prompt`` wraps it in the chat template
of an instruct model when the tokenizer has one. ``Task.training_rows`` and ``Task.evaluate`` both go
through these two functions, so a model is trained on exactly the text it is later scored on.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
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
