"""``verify``: run every integrity and compatibility check of a diff and report each one.

Loading a diff (``diffio.read_diff``) stops at the first problem, which is right for loading; a
reviewer gating a deployment wants the whole list. So the same diffio checks run here one by one,
each as a named check that passes, fails with a one-line reason, or is skipped when an earlier
check left nothing to look at (e.g. indices of an unreadable file).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import diffio
from ..errors import SparseFTError
from ..targets import find_targets

# In the order they run; "shapes" and "fingerprint" need the base model.
CHECKS = ("config", "file_hashes", "tensors", "dtypes", "selection", "indices", "values", "shapes", "fingerprint")


@dataclass
class CheckResult:
    """One check: ``status`` is "pass", "fail" or "skip"; ``reason`` says why it failed or was skipped."""

    name: str
    status: str
    reason: str = ""

    def line(self) -> str:
        if self.status == "pass":
            return f"PASS {self.name}"
        reason = " ".join(self.reason.split())  # one line per check, whatever the message holds
        return f"{self.status.upper()} {self.name}: {reason}"


def run_check(name: str, check: Callable[[], Any]) -> tuple[CheckResult, Any]:
    """Run one check; a sparseft error is its failure, anything else is a bug and propagates."""
    try:
        return CheckResult(name, "pass"), check()
    except SparseFTError as e:
        return CheckResult(name, "fail", str(e)), None


def per_module(check: Callable[[str], None], names: list[str]) -> None:
    """Apply ``check`` to every module; raise the first failure, counting the other failing modules."""
    failures = []
    for name in names:
        try:
            check(name)
        except SparseFTError as e:
            failures.append(e)
    if failures:
        more = f" (and {len(failures) - 1} more module(s))" if len(failures) > 1 else ""
        raise type(failures[0])(f"{failures[0]}{more}")


def target_weights(model: nn.Module, module_names: list[str]) -> dict[str, torch.Tensor]:
    """The weights of exactly the diff's modules (names absent from the model are left out)."""
    present = [n for n, _ in model.named_modules() if n in set(module_names)]
    if not present:
        return {}
    return {n: layer.weight for n, layer in find_targets(model, present).items()}


def verify_diff(path: str | os.PathLike, model: nn.Module | None = None) -> list[CheckResult]:
    """Every check of ``CHECKS`` on the diff at ``path``; ``shapes`` and ``fingerprint`` need ``model``.

    Example:
        >>> results = verify_diff("my-diff", base)  # doctest: +SKIP
        >>> all(r.status != "fail" for r in results)  # doctest: +SKIP
        True
    """
    path = Path(path)
    results: list[CheckResult] = []

    res, meta = run_check("config", lambda: diffio.read_config(path))
    results.append(res)
    if meta is None:
        return results + [CheckResult(n, "skip", "needs a readable sparse_config.json") for n in CHECKS[1:]]
    where = str(path / diffio.DELTA_NAME)
    # Go on after a hash mismatch: the later checks tell what the modification broke.
    results.append(run_check("file_hashes", lambda: diffio.check_file_hashes(path, meta))[0])
    res, streams = run_check("tensors", lambda: read_streams(path, meta, where))
    results.append(res)
    if streams is None:
        results.append(CheckResult("dtypes", "skip", "needs a readable tensor file"))
    else:
        results.append(run_check("dtypes", lambda: diffio.check_value_dtype(meta, streams[0], where))[0])
    results.append(run_check("selection", lambda: diffio.parse_selection(meta, str(path / diffio.CONFIG_NAME)))[0])
    if streams is None:
        results += [CheckResult(n, "skip", "needs a readable tensor file") for n in ("indices", "values")]
    else:
        results += module_checks(meta, *streams[1], where)
    results += model_checks(path, meta, model)
    return results


def read_streams(path: Path, meta: dict[str, Any], where: str):
    """The raw tensors and their per-module split (masks, values)."""
    tensors = diffio.load_delta_tensors(path)
    return tensors, diffio.split_modules(meta, tensors, where)


def module_checks(meta: dict[str, Any], masks: dict, values: dict, where: str) -> list[CheckResult]:
    names = sorted(masks)
    shapes = {n: tuple(meta["tensors"][n]["shape"]) for n in names}

    def indices(name: str) -> None:
        diffio.check_indices(name, masks[name], math.prod(shapes[name]), where)

    def finite(name: str) -> None:
        diffio.check_values(name, values[name], masks[name].numel(), where)

    return [run_check("indices", lambda: per_module(indices, names))[0], run_check("values", lambda: per_module(finite, names))[0]]


def model_checks(path: Path, meta: dict[str, Any], model: nn.Module | None) -> list[CheckResult]:
    if model is None:
        return [CheckResult(n, "skip", "no base model given") for n in ("shapes", "fingerprint")]
    shapes = {n: tuple(spec["shape"]) for n, spec in meta["tensors"].items()}
    if not shapes:
        return [CheckResult(n, "skip", "the diff changes no module") for n in ("shapes", "fingerprint")]
    weights = target_weights(model, list(shapes))
    results = [run_check("shapes", lambda: diffio.check_shapes(shapes, weights, str(path)))[0]]
    if results[0].status == "fail":
        results.append(CheckResult("fingerprint", "skip", "needs every module of the diff in the model"))
        return results
    prints = meta.get("base_fingerprint") or {}
    if not prints:
        results.append(CheckResult("fingerprint", "fail", f"{path}: the diff records no base fingerprint"))
        return results
    check = lambda: diffio.check_base_fingerprint(prints, meta.get("base_model", ""), weights, str(path))  # noqa: E731
    results.append(run_check("fingerprint", check)[0])
    return results


def failed(results: list[CheckResult]) -> list[CheckResult]:
    return [r for r in results if r.status == "fail"]


def format_verification(results: list[CheckResult]) -> str:
    """One line per check: ``PASS name``, ``FAIL name: reason`` or ``SKIP name: reason``."""
    return "\n".join(r.line() for r in results)


def results_json(results: list[CheckResult]) -> dict[str, Any]:
    return {"ok": not failed(results), "checks": [asdict(r) for r in results]}
