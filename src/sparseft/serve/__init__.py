"""Serving one base model with many sparse diffs, chosen per request (OpenAI-compatible HTTP API).

- ``registry.py``: named diffs, versions, rollback, persistence.
- ``engine.py``: the switching strategy (merge on switch, exact restore, one worker).
- ``decoding.py``: prompt encoding, ``generate`` with streaming and stop strings.
- ``app.py`` / ``protocol.py``: the FastAPI routes and the OpenAI wire format.
- ``server.py``: assembling all of it from a model name and diff directories (``sparseft serve``).
- ``ray_app.py``: the same app as replicas on Ray Serve (``sparseft serve --ray``; needs the ``ray`` extra).
"""

from .app import ServeLimits, create_app
from .decoding import Completion, SamplingParams
from .engine import Engine
from .registry import DiffRegistry, DiffVersion
from .server import build_app

__all__ = ["Completion", "DiffRegistry", "DiffVersion", "Engine", "SamplingParams", "ServeLimits", "build_app", "create_app"]
