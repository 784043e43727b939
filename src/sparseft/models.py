"""Loading base models by alias, local directory or (when online) hub id."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from .errors import ModelNotFoundError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# alias -> function that returns a local model directory (building it on first use).
ALIASES: dict[str, Callable[[], Path]] = {}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """A local directory for an alias or a directory; a hub id is passed through unchanged."""
    name = str(name_or_path)
    if name in ALIASES:
        return str(ALIASES[name]())
    if Path(name).is_dir():
        return name
    if looks_like_hub_id(name):
        return name
    raise ModelNotFoundError(
        f"{name}: not a known model alias ({', '.join(sorted(ALIASES)) or 'none registered'}) "
        "or a local model directory"
    )


def load_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = "float32"):
    """A causal LM from an alias, a local directory, or an HF id when online."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), dtype=resolve_dtype(dtype))


def load_tokenizer(name_or_path: str | os.PathLike, required: bool = True):
    """The model's tokenizer; with ``required=False``, None when the directory has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    except (OSError, ValueError):
        if required:
            raise
        return None


def save_model_dir(model, tokenizer, out: str | os.PathLike) -> Path:
    """``save_pretrained`` into a temporary sibling renamed into place, so a crash leaves no half model."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/")) and not os.path.exists(name)
