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
from ..files import existing_file, take, text_field
from ..hfdata import dataset_rows, is_dataset_spec
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
    """Questions of a SQuAD v1.1 file, optionally only from the articles in ``articles`` (a split by article).

    Every level is checked before it is used, so a malformed file fails with a
    :class:`DataFormatError` naming the file and the item (``data[3].paragraphs[0].qas[2].answers[0].text``)
    instead of a ``KeyError`` deep inside. Answers whose text is blank are skipped; a question needs at
    least one that is not. A Hugging Face dataset spec (``hf:rajpurkar/squad:validation``) is read by
    ``read_squad_rows``.
    """
    if is_dataset_spec(path):
        return read_squad_rows(path, articles)
    path = existing_file(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: not a SQuAD JSON file ({e})") from None
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: not a SQuAD JSON file: expected a top-level object with a 'data' list")
    records = []
    for a in range(len(data))[articles or slice(None)]:  # absolute indices, so errors name the real item
        at_article = f"{path}: data[{a}]"
        for p, paragraph in enumerate(_list_field(_object(data[a], at_article), "paragraphs", at_article)):
            at_paragraph = f"{at_article}.paragraphs[{p}]"
            paragraph = _object(paragraph, at_paragraph)
            context = text_field(paragraph, "context", at_paragraph)
            for q, qa in enumerate(_list_field(paragraph, "qas", at_paragraph)):
                at_question = f"{at_paragraph}.qas[{q}]"
                qa = _object(qa, at_question)
                question = text_field(qa, "question", at_question)
                qid = qa.get("id", "")
                if not isinstance(qid, str):
                    raise DataFormatError(f"{at_question}.id: expected a string, got {qid!r:.60}")
                answers = []
                for m, answer in enumerate(_list_field(qa, "answers", at_question)):
                    at_answer = f"{at_question}.answers[{m}]"
                    text = _object(answer, at_answer).get("text")
                    if not isinstance(text, str):
                        raise DataFormatError(f"{at_answer}.text: expected a string, got {text!r:.60}")
                    if text.strip():
                        answers.append(text)
                if not answers:
                    raise DataFormatError(f"{at_question}.answers: needs at least one answer with a non-empty 'text'")
                records.append({"id": qid, "context": context, "question": question, "answers": answers})
    return records


def read_squad_rows(source, articles: slice | None = None) -> list[Record]:
    """Questions of a SQuAD split on the Hugging Face Hub: flat rows ``{id, title, context, question,
    answers: {text: [...], answer_start: [...]}}``. An article is a ``title``, numbered in order of first
    appearance (the order of the official file), so ``articles`` splits the same way as for the JSON file."""
    rows = list(dataset_rows(source))
    titles = list(dict.fromkeys(text_field(row, "title", where) for where, row in rows))
    kept = set(titles[articles or slice(None)])
    records = []
    for where, row in rows:
        if row["title"] not in kept:
            continue
        answers = row.get("answers")
        texts = answers.get("text") if isinstance(answers, dict) else None
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts) or not any(t.strip() for t in texts):
            raise DataFormatError(f"{where}: field 'answers' must be {{'text': [non-empty strings], ...}}, got {answers!r:.80}")
        records.append({
            "id": str(row.get("id", "")),
            "context": text_field(row, "context", where),
            "question": text_field(row, "question", where),
            "answers": [t for t in texts if t.strip()],
        })
    return records


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _list_field(obj: dict, field: str, where: str) -> list:
    """A required list field (``paragraphs``, ``qas``, ``answers``)."""
    if field not in obj:
        raise DataFormatError(f"{where}: missing field {field!r} (fields present: {sorted(obj)})")
    if not isinstance(obj[field], list):
        raise DataFormatError(f"{where}.{field}: expected a list, got {type(obj[field]).__name__}")
    return obj[field]


@dataclass
class QATask(Task):
    """Generate a short answer to a question about a passage; exact match and F1 against the references."""

    name: str = "squad"
    articles: slice | None = None  # a split by article, e.g. slice(40, None) for the last 8 of the dev file
    max_new_tokens: int = 24
    family: str = "qa"
    # Token F1 gives partial credit; exact match reads 0 for a small model that answers in its own words.
    primary_metric: str = "f1"
    template: str = (
        "Read the passage and answer the question with a short phrase copied from the passage.\n\n"
        "Passage: {context}\n\nQuestion: {question}"
    )

    def load(self, path, limit=None):
        records = read_squad_json(path, self.articles)
        return take(records, limit, path, f"questions (articles={self.articles})")

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
        return self.evaluate_detailed(model, tokenizer, records, batch_size, progress)[0]

    def evaluate_detailed(self, model, tokenizer, records, batch_size=8, progress=True):
        predictions = self.predict(model, tokenizer, records, batch_size, progress)
        refs = [r["answers"] for r in records]
        n = len(records)
        per_example = {
            "exact_match": [best_over_references(exact_match, p, r) for p, r in zip(predictions, refs)],
            "f1": [best_over_references(token_f1, p, r) for p, r in zip(predictions, refs)],
        }
        return {name: sum(scores) / n for name, scores in per_example.items()}, per_example
