"""Training: rows → batches (data), the loop (loop), the whole job (job), methods in ``sparseft.methods``.

Example:
    >>> from sparseft.training import TrainConfig, run_training
    >>> result = run_training(TrainConfig(model="smollm2-135m", data="train.jsonl", out="runs/a", steps=50))  # doctest: +SKIP
"""

from .config import TrainConfig
from .data import collate, load_examples, load_rows, make_batches
from .job import TrainResult, run_training

__all__ = ["TrainConfig", "TrainResult", "collate", "load_examples", "load_rows", "make_batches", "run_training"]
