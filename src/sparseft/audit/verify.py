"""``verify``: run every integrity and compatibility check of a diff and report each one.

Loading a diff (``diffio.read_diff``) stops at the first problem, which is right for loading; a
reviewer gating a deployment wants the whole list. So the same steps (``diffio.READ_STEPS``, then
the checks of ``diffio.check_against_model``) run here one by one, each as a named check that passes,
fails with a one-line reason, or is skipped when an earlier check left nothing to look at (e.g.
indices of an unreadable file). One code path: verify passes exactly the diffs that load.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import base_match, diffio
from ..errors import SparseFTError

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


def verify_diff(path: str | os.PathLike, model: nn.Module | None = None) -> list[CheckResult]:
    """Every check of ``CHECKS`` on the diff at ``path``; ``shapes`` and ``fingerprint`` need ``model``.

    The checks before them are ``diffio.READ_STEPS``, the very steps loading runs; verify only goes on
    past a failure (each later step runs when what it needs was established) and, unlike loading, has
    no opt-out for a missing base fingerprint.

    Example:
        >>> results = verify_diff("my-diff", base)  # doctest: +SKIP
        >>> all(r.status != "fail" for r in results)  # doctest: +SKIP
        True
    """
    reading = diffio.DiffReading(Path(path))
    results: list[CheckResult] = []
    for step in diffio.READ_STEPS:
        missing = [field for field in step.needs if getattr(reading, field) is None]
        if missing:
            results.append(CheckResult(step.name, "skip", f"needs what an earlier check could not establish ({missing[0]})"))
        else:
            results.append(run_check(step.name, lambda: step.run(reading))[0])
    return results + model_checks(reading, model)


def model_checks(reading: diffio.DiffReading, model: nn.Module | None) -> list[CheckResult]:
    """The checks loading runs against the base (``diffio.check_against_model``), one result each."""
    if model is None:
        return [CheckResult(n, "skip", "no base model given") for n in ("shapes", "fingerprint")]
    if reading.meta is None or reading.config is None:
        return [CheckResult(n, "skip", "needs a readable config and selection") for n in ("shapes", "fingerprint")]
    meta, where = reading.meta, str(reading.path)
    shapes = reading.shapes
    res, weights = run_check("shapes", lambda: checked_weights(model, reading.config, shapes, where))
    if weights is None:
        return [res, CheckResult("fingerprint", "skip", "needs every module of the diff in the model")]
    prints = meta.get("base_fingerprint") or {}
    check = lambda: base_match.check_base_fingerprint(prints, meta.get("base_model", ""), weights, where,  # noqa: E731
                                                      provenance=meta.get("provenance"))
    return [res, run_check("fingerprint", check)[0]]


def checked_weights(model: nn.Module, config, shapes: dict[str, tuple[int, ...]], where: str) -> dict[str, torch.Tensor]:
    """The base weights of the diff's modules, after the shape check loading runs."""
    weights = diffio.target_weights(model, config)
    diffio.check_shapes(shapes, weights, where)
    return {n: weights[n] for n in shapes}


def failed(results: list[CheckResult]) -> list[CheckResult]:
    return [r for r in results if r.status == "fail"]


def format_verification(results: list[CheckResult]) -> str:
    """One line per check: ``PASS name``, ``FAIL name: reason`` or ``SKIP name: reason``."""
    return "\n".join(r.line() for r in results)


def results_json(results: list[CheckResult]) -> dict[str, Any]:
    return {"ok": not failed(results), "checks": [asdict(r) for r in results]}
