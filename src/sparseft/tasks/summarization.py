"""Dialogue summarization (SAMSum): generate a summary, score ROUGE-1/2/L F-measure with stemming."""

from __future__ import annotations

from dataclasses import dataclass

from .base import RowSplit, Task, encode_prompt
from ..files import read_objects, take, text_field
from .inference import generate_texts

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def read_dialogue_jsonl(path) -> list[dict]:
    """``{"dialogue", "summary"}`` lines. SAMSum mixes ``\\r\\n`` and ``\\n`` between turns: both become ``\\n``."""
    records = []
    for where, obj in read_objects(path):
        dialogue = text_field(obj, "dialogue", where)
        turns = [t.strip() for t in dialogue.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
        records.append({"dialogue": "\n".join(t for t in turns if t), "summary": text_field(obj, "summary", where).strip()})
    return records


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (``rouge-score`` with the Porter stemmer)."""
    return rouge_scores_detailed(predictions, references)[0]


def rouge_scores_detailed(predictions: list[str], references: list[str]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """``(mean ROUGE-1/2/L F-measure, each example's)``; the means are summed in the examples' order."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    per_example: dict[str, list[float]] = {kind: [] for kind in ROUGE_TYPES}
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        for kind in ROUGE_TYPES:
            totals[kind] += scores[kind].fmeasure
            per_example[kind].append(scores[kind].fmeasure)
    return {kind: total / max(1, len(predictions)) for kind, total in totals.items()}, per_example


@dataclass
class SummarizationTask(Task):
    """Summarise a chat dialogue in one or two sentences."""

    name: str = "samsum"
    max_new_tokens: int = 64
    family: str = "summarization"
    split: RowSplit | None = None  # a fit / validation part of the file (None: all of it)
    template: str = "Summarize the following conversation in one or two sentences.\n\n{dialogue}"

    def load(self, path, limit=None):
        records = read_dialogue_jsonl(path)
        if self.split is not None:
            records = self.split.apply(records)
        return take(records, limit, path, "dialogues")

    def instruction(self, record):
        return self.template.format(**record)

    def target(self, record):
        return record["summary"]

    def predict(self, model, tokenizer, records, batch_size=8, progress=False) -> list[str]:
        prompts = [encode_prompt(tokenizer, self.prompt(tokenizer, r)) for r in records]
        return generate_texts(model, tokenizer, prompts, self.max_new_tokens, batch_size, progress)

    def evaluate(self, model, tokenizer, records, batch_size=8, progress=True):
        return self.evaluate_detailed(model, tokenizer, records, batch_size, progress)[0]

    def evaluate_detailed(self, model, tokenizer, records, batch_size=8, progress=True):
        predictions = self.predict(model, tokenizer, records, batch_size, progress)
        return rouge_scores_detailed(predictions, [r["summary"] for r in records])
