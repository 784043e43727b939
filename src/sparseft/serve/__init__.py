"""Serving one base model with many sparse diffs, chosen per request (OpenAI-compatible HTTP API).

- ``registry.py``: named diffs, versions, rollback, persistence.
- ``engine.py``: the ``merged`` strategy (merge on switch, exact restore, one request at a time).
- ``batching.py``: the ``mixed`` and ``auto`` strategies (continuous batching, rows of different diffs).
- ``mixed.py``: the unmerged forward: per-row diffs added by hooks on the targeted linears.
- ``decoding.py``: prompt encoding, ``generate`` with streaming and stop strings.
- ``app.py`` / ``protocol.py``: the FastAPI routes and the OpenAI wire format.
- ``server.py``: assembling all of it from a model name and diff directories (``sparseft serve``).
- ``ray_app.py``: the same app as replicas on Ray Serve (``sparseft serve --ray``; needs the ``ray`` extra).
"""

from .app import ServeLimits, create_app
from .batching import BatchingEngine
from .decoding import Completion, SamplingParams
from .engine import Engine
from .registry import DiffRegistry, DiffVersion
from .server import build_app

__all__ = [
    "BatchingEngine", "Completion", "DiffRegistry", "DiffVersion", "Engine", "SamplingParams", "ServeLimits",
    "build_app", "create_app",
]
