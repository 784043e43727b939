"""Which base a diff was made for: the fingerprint of the targeted weights as loaded (a quantized
weight hashed as stored), the check that a base matches what a diff records, and the words of a
refusal — read from the diff's provenance (the dtype, quantization and unquantized layers its training
run loaded the base with), so it says how to load the right base.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Callable

import torch

from .errors import FingerprintMismatchError, UnverifiedBaseError
from .quantize import WEIGHT_CLASSES, scheme_of_weight_class

LINEAR_CLASSES = set(WEIGHT_CLASSES.values())

log = logging.getLogger(__name__)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def is_wrapper_tensor(t: torch.Tensor) -> bool:
    """A tensor subclass that stores other tensors, e.g. torchao's quantized weights (int8 data + scales)."""
    return hasattr(type(t), "__tensor_flatten__")


def stored_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold ``t``: itself, or a wrapper's inner tensors (recursively, in its order)."""
    if not is_wrapper_tensor(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [part for name in names for part in stored_tensors(getattr(t, name))]


def weight_kind(t: torch.Tensor) -> str:
    """What a fingerprint is keyed by: the dtype (``float32``), or a wrapper's class (``Int8Tensor``)."""
    return type(t).__name__ if is_wrapper_tensor(t) else str(t.dtype).removeprefix("torch.")


def base_kind(weights: dict[str, torch.Tensor]) -> str:
    """What a base's fingerprint is keyed by: its quantized weights' class where it has any (a mixed base,
    some layers skipped by ``quantize_skip``, is still that quantized base), else its first weight's dtype.
    The linear layers' class comes first: q4_1's head tied to the embedding is Q8_0, and the key must not
    depend on the order the weights are listed in."""
    kinds = [weight_kind(w) for w in weights.values()]
    quantized = sorted((kind for kind in kinds if scheme_of_weight_class(kind)), key=lambda k: k not in LINEAR_CLASSES)
    return quantized[0] if quantized else kinds[0]


def fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of exactly the targeted weights; a quantized
    weight is hashed as stored (its class and every inner tensor: codes, scales, zero points)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        w = weights[name]
        h.update(f"{name}|{tuple(w.shape)}|{w.dtype}\n".encode())
        if is_wrapper_tensor(w):
            h.update(f"{type(w).__name__}|{[(tuple(p.shape), p.dtype) for p in stored_tensors(w)]}\n".encode())
        for part in stored_tensors(w):
            h.update(tensor_bytes(part))
    return h.hexdigest()


def fingerprints(weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """Fingerprints of the base in its own dtype and, for fp32 bases, as rounded to bf16 too,
    so a diff trained on fp32 weights can be checked against the same base served in bf16.
    A quantized base is keyed by its weights' class (see ``weight_kind``)."""
    dtype = base_kind(weights)
    prints = {dtype: fingerprint(weights)}
    if dtype == "float32":
        prints["bfloat16"] = fingerprint({n: w.to(torch.bfloat16) for n, w in weights.items()})
    return prints


def refuse_unverified(message: str, action: str, allow_unverified_base: bool) -> None:
    """A diff that records no base fingerprint: UnverifiedBaseError (``message``, and how to ``action`` it anyway),
    unless ``allow_unverified_base``, which only logs it."""
    if not allow_unverified_base:
        raise UnverifiedBaseError(f"{message}; {action} it anyway with allow_unverified_base=True (--allow-unverified-base)")
    log.warning("%s; going on (allow_unverified_base)", message)


def check_base_fingerprint(
    expected_prints: dict[str, str],
    base_model: str,
    weights: dict[str, torch.Tensor],
    where: str,
    fingerprint_of: Callable[[dict[str, torch.Tensor]], str] = fingerprint,
    allow_unverified_base: bool = False,
    provenance: dict[str, Any] | None = None,
) -> None:
    """``weights`` are the base ``expected_prints`` were recorded for.

    A diff that records no fingerprint cannot prove its base: it is refused (UnverifiedBaseError)
    unless ``allow_unverified_base``, which loads it with a logged warning.
    ``check_against_model`` calls it for a whole diff; ``audit.verify`` calls it with a config's fields.
    ``fingerprint_of`` lets a caller whose weights may hold a merged diff (the server) hash the base
    entries instead of the live ones, or reuse a cached hash. ``provenance`` (the diff's) only words a
    refusal: the dtype and quantization its training run loaded the base in, where it records them."""
    if not expected_prints:
        refuse_unverified(f"{where}: the diff records no base fingerprint, so nothing shows it was made for this base "
                          "model", "load", allow_unverified_base)
        return
    first = next(iter(weights.values()))
    dtype, trained = base_kind(weights), trained_over(provenance)
    skip = trained_skip(provenance)
    if dtype not in expected_prints:
        raise FingerprintMismatchError(
            f"{where}: the diff records base fingerprints for {sorted(expected_prints)} weights, "
            f"but the model's weights are {dtype}; {how_to_load(expected_prints, trained, skip)}"
        )
    actual = fingerprint_of(weights)
    expected = expected_prints[dtype]
    if actual != expected:
        raise FingerprintMismatchError(
            different_dtype_message(dtype, dtype_name(first.dtype), trained, where, skip)
            or f"{where}: the diff was made for a different base model "
            f"(diff expects {dtype} fingerprint {expected[:16]}…, this model has {actual[:16]}…; "
            f"diff base: {base_model or 'unnamed'}){same_model_hint(dtype, trained)}{skip_hint(dtype, skip)}"
        )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def recorded_train_config(provenance: dict[str, Any] | None) -> dict[str, Any]:
    """The training config a diff's provenance records (``sparseft train`` writes it; a composed diff records
    its inputs' base fields as ``base_as_trained``); empty when it has none."""
    if not isinstance(provenance, dict):
        return {}
    config = provenance.get("train_config", provenance.get("base_as_trained"))
    return config if isinstance(config, dict) else {}


def trained_over(provenance: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """``(dtype, quantize)`` the diff's training run loaded its base in, as its provenance records them
    (``sparseft train`` records its config); None for what it does not record."""
    config = recorded_train_config(provenance)
    dtype, scheme = config.get("dtype"), config.get("quantize")
    return (dtype if isinstance(dtype, str) else None), (scheme if isinstance(scheme, str) else None)


def trained_skip(provenance: dict[str, Any] | None) -> list[str]:
    """The layer patterns the diff's training run left unquantized (``quantize_skip``), as its provenance records."""
    skip = recorded_train_config(provenance).get("quantize_skip")
    return [p for p in skip if isinstance(p, str)] if isinstance(skip, list) else []


def skip_hint(kind: str, skip: list[str]) -> str:
    """For a diff trained over a mixed base: the layers its base left unquantized must be left so again."""
    scheme = scheme_of_weight_class(kind)
    if not skip or scheme is None:
        return ""
    return f"; its training run left the layers {skip} unquantized: {mixed_base_advice(scheme, skip)}"


def mixed_base_advice(scheme: str, skip: list[str], dtype: str | None = None) -> str:
    loaded = f" loaded in {dtype}" if dtype else ""
    patterns = ",".join(skip)
    return (f"load the base with {load_flags(dtype, scheme)} in the same command as this diff, which rebuilds that "
            f"base from what the diff records (a server given its diffs later: serve --quantize-skip '{patterns}'; "
            f"in Python: quantize_base(model, {scheme!r}, skip={skip!r}) on the base{loaded})")


def described_base(dtype: str | None, scheme: str) -> str:
    """A quantized base in words: what its other weights are stored in, and its linear weights."""
    return f"{dtype} non-quantized weights and {scheme} linear weights" if dtype else f"{scheme} linear weights"


def load_flags(dtype: str | None, scheme: str) -> str:
    return f"--dtype {dtype} --quantize {scheme}" if dtype else f"--quantize {scheme}"


def how_to_load(
    expected_prints: dict[str, str], trained: tuple[str | None, str | None] = (None, None), skip: list[str] | None = None,
) -> str:
    """What to load instead, said from the weight kinds a diff records fingerprints for: a quantized base's
    scheme (with the dtype the run loaded it in, where ``trained`` knows it), else a plain base's dtypes."""
    schemes = [scheme for kind in sorted(expected_prints) if (scheme := scheme_of_weight_class(kind))]
    if schemes:
        scheme = schemes[0]
        dtype = trained[0] if trained[1] == scheme else None
        if skip:
            return (f"the diff was trained over a base with {described_base(dtype, scheme)} but for the layers "
                    f"{skip}, left unquantized; {mixed_base_advice(scheme, skip, dtype)}")
        return (f"the diff was trained over a base with {described_base(dtype, scheme)}; load it with "
                f"{load_flags(dtype, scheme)} (in Python: quantize_base(model, {scheme!r}))")
    dtypes = " or ".join(f"--dtype {kind}" for kind in sorted(expected_prints))
    return f"load the base in one of those dtypes, not quantized ({dtypes}, no --quantize)"


def different_dtype_message(
    kind: str, dtype: str, trained: tuple[str | None, str | None], where: str, skip: list[str] | None = None,
) -> str | None:
    """The refusal for a quantized base quantized from another dtype than the diff's run used (its weights'
    class is the same, so the fingerprint alone would only say "a different base"); None otherwise."""
    scheme = scheme_of_weight_class(kind)
    trained_dtype, trained_scheme = trained
    if scheme is None or trained_scheme != scheme or trained_dtype in (None, dtype):
        return None
    advice = (mixed_base_advice(scheme, skip, trained_dtype) if skip
              else f"load it with {load_flags(trained_dtype, scheme)}")
    return (f"{where}: the diff was trained over a base with {described_base(trained_dtype, scheme)}; this base has "
            f"{described_base(dtype, scheme)}; {advice}")


def same_model_hint(kind: str, trained: tuple[str | None, str | None]) -> str:
    """For a quantized base whose dtype the diff does not record: the dtype is one thing to check."""
    if scheme_of_weight_class(kind) is None or trained[0] is not None:
        return ""
    return "; if it is that model, it must also be loaded in the --dtype it was quantized from in training"
