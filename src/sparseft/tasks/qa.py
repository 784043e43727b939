"""Extractive question answering (SQuAD v1.1): generate an answer, score exact match and token F1.

The scoring follows the official SQuAD v1.1 evaluation: answers are normalised (lower case, no
punctuation, no articles a/an/the, single spaces) and each prediction takes its best score over the
reference answers.
"""

from __future__ import annotations

import collections
import json
import re
import string
from dataclasses import dataclass

from ..errors import DataFormatError
from .base import Record, Task, encode_prompt
from .files import existing_file, take
from .inference import generate_texts

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse white space."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall, counting repeated tokens (a bag of words)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over_references(metric, prediction: str, references: list[str]) -> float:
    return max(metric(prediction, ref) for ref in references)


def read_squad_json(path, articles: slice | None = None) -> list[Record]:
    """Questions of a SQuAD v1.1 file, optionally only from the articles in ``articles`` (a split by article)."""
    path = existing_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataFormatError(f"{path}: not a SQuAD JSON file with a top-level 'data' list ({e})") from None
    records = []
    for a, article in enumerate(data[articles] if articles else data):
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            for q, qa in enumerate(paragraph.get("qas", [])):
                where = f"{path}: data[{a}].paragraphs[{p}].qas[{q}]"
                answers = [ans.get("text", "") for ans in qa.get("answers", []) if ans.get("text", "").strip()]
                if not answers or not qa.get("question", "").strip():
                    raise DataFormatError(f"{where}: needs a 'question' and at least one answer with 'text'")
                records.append(
                    {"id": qa.get("id", ""), "context": paragraph["context"], "question": qa["question"], "answers": answers}
                )
    return records


@dataclass
class QATask(Task):
    """Generate a short answer to a question about a passage; exact match and F1 against the references."""

    name: str = "squad"
    articles: slice | None = None  # a split by article, e.g. slice(40, None) for the last 8 of the dev file
    max_new_tokens: int = 24
    family: str = "qa"
    template: str = (
        "Read the passage and answer the question with a short phrase copied from the passage.\n\n"
        "Passage: {context}\n\nQuestion: {question}"
    )

    def load(self, path, limit=None):
        records = read_squad_json(path, self.articles)
        if not records:
            raise DataFormatError(f"{path}: no questions (articles={self.articles})")
        return take(records, limit)

    def instruction(self, record):
        return self.template.format(**record)

    def target(self, record):
        return record["answers"][0]

    def predict(self, model, tokenizer, records, batch_size=8, progress=False) -> list[str]:
        prompts = [encode_prompt(tokenizer, self.prompt(tokenizer, r)) for r in records]
        texts = generate_texts(model, tokenizer, prompts, self.max_new_tokens, batch_size, progress)
        # The answer is a phrase: anything after a first line break is the model rambling on.
        return [t.split("\n")[0].strip() for t in texts]

    def evaluate(self, model, tokenizer, records, batch_size=8, progress=True):
        predictions = self.predict(model, tokenizer, records, batch_size, progress)
        refs = [r["answers"] for r in records]
        n = len(records)
        return {
            "exact_match": sum(best_over_references(exact_match, p, r) for p, r in zip(predictions, refs)) / n,
            "f1": sum(best_over_references(token_f1, p, r) for p, r in zip(predictions, refs)) / n,
        }
