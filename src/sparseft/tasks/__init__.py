"""Task registry: a task is a prompt format, a data loader and a metric (see ``tasks.base.Task``).

Adding a task: one instance (or a new family module) plus one ``register_task`` line, or, without
Python, a YAML task file (``tasks.taskfile``) whose path ``get_task`` takes in place of a name.

Example:
    >>> task = get_task("sst2")
    >>> records = task.load("../shared/data/sst2/dev.tsv", limit=50)  # doctest: +SKIP
    >>> task.evaluate(model, tokenizer, records)  # doctest: +SKIP
    {'accuracy': ..., ...}
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import ConfigError
from .base import RowSplit, Task, completion_text, render_prompt
from .classification import ClassificationTask, read_labelled_jsonl, read_sst2_tsv
from .qa import QATask
from .summarization import SummarizationTask
from .taskfile import classification_from_flags, load_task_file, looks_like_task_file

TASKS: dict[str, Task] = {}

ROUTING_DEPARTMENTS = ["billing", "technical", "shipping", "account", "returns", "sales"]
# The bundled demo data set (train.jsonl, test.jsonl): package data, so `sparseft demo` works from a wheel too.
ROUTING_DATA = Path(str(resources.files("sparseft") / "data" / "support_routing"))


def register_task(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """A registered task by name, or the task a YAML task file declares (a path ending in .yaml/.yml)."""
    if looks_like_task_file(name):
        return load_task_file(name)
    if name not in TASKS:
        raise ConfigError(
            f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}, or a task file path/to/task.yaml"
        )
    return TASKS[name]


register_task(
    ClassificationTask(
        name="sst2",
        template="What is the sentiment of this movie review? Answer with one word: {labels}.\n\nReview: {text}",
        labels=["negative", "positive"],
        reader=read_sst2_tsv,
    )
)
register_task(
    ClassificationTask(
        name="routing",
        template=(
            "You work at the help desk of Brightline, an online electronics shop. Which department should "
            "handle this customer message? Answer with one word: {labels}.\n\nMessage: {text}"
        ),
        labels=ROUTING_DEPARTMENTS,
        reader=read_labelled_jsonl,
    )
)
register_task(QATask(name="squad"))
# SQuAD ships only a dev file here: fine-tuning experiments split it by article (40 train / 8 eval).
register_task(QATask(name="squad-train", articles=slice(0, 40)))
register_task(QATask(name="squad-heldout", articles=slice(40, None)))
register_task(SummarizationTask(name="samsum"))

# Validation splits for choosing learning rates (and scorers) without touching the scored test split
# (``sparseft bench --stage validation``): each ``-fit`` task trains on a file, its ``-val`` partner
# holds out every n-th record of the same file, and the test split is another file or other articles.
SST2_TEMPLATE = TASKS["sst2"].template
for part, suffix in (("fit", "fit"), ("validation", "val")):
    # SST-2: test = dev.tsv (872); validation = every 50th row of train.tsv (1,347 rows), fit = the rest.
    register_task(ClassificationTask(name=f"sst2-{suffix}", template=SST2_TEMPLATE, labels=["negative", "positive"],
                                     reader=read_sst2_tsv, split=RowSplit(50, part)))
    # SAMSum: test = test.jsonl (819); validation = every 5th dialogue of validation.jsonl (164), fit = the rest (654).
    register_task(SummarizationTask(name=f"samsum-{suffix}", split=RowSplit(5, part)))
# SQuAD by article: fit 0-35, validation 36-39, test = squad-heldout (40-47, as in the committed results).
register_task(QATask(name="squad-fit", articles=slice(0, 36)))
register_task(QATask(name="squad-val", articles=slice(36, 40)))

__all__ = [
    "ROUTING_DATA",
    "TASKS",
    "ClassificationTask",
    "QATask",
    "RowSplit",
    "SummarizationTask",
    "Task",
    "classification_from_flags",
    "completion_text",
    "get_task",
    "load_task_file",
    "register_task",
    "render_prompt",
]
