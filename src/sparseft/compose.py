"""Composing diffs of one base: a weighted sum of several diffs as one diff, and how two diffs overlap.

A diff is a set of (module, flat index) entries with a value each. ``compose`` takes the union of the
entries and sums the values with per-diff weights, so merging the result equals merging the inputs one
after another (scaled). Entries whose sum is exactly 0 (``A`` composed with ``-1 * A``) change nothing
and are dropped. ``overlap_stats`` compares two diffs: entries shared, Jaccard index, per-module overlap
and the cosine of the values on shared entries.

All inputs must record the same base fingerprint and the same shapes, or nothing is composed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from .config import DTYPES, SparseConfig
from .base_match import fingerprints, refuse_unverified, trained_over, trained_skip
from .diffio import SparseDiff, check_against_model
from .errors import ConfigError, FingerprintMismatchError, ShapeMismatchError


# ---------------------------------------------------------------- checks


def check_same_base(
    diffs: Sequence[SparseDiff], names: Sequence[str], base_weights: dict[str, torch.Tensor] | None = None,
    allow_unverified_base: bool = False,
) -> None:
    """Every diff was made for the same base.

    A diff's fingerprint covers the weights of its own modules only. With ``base_weights`` (the base's
    linear weights by module name) each diff is checked against the base itself; one that records no
    fingerprint is refused unless ``allow_unverified_base`` (then a logged warning). Without, the diffs must
    change the same modules, so their fingerprints cover the same weights and can be compared directly (one
    that records none is refused the same way).
    """
    if base_weights is not None:
        for diff, name in zip(diffs, names):
            check_against_model(diff, base_weights, where=name, allow_unverified_base=allow_unverified_base)
        return
    first, first_name = diffs[0], names[0]
    for diff, name in zip(diffs[1:], names[1:]):
        if set(diff.shapes) != set(first.shapes):
            raise ConfigError(
                f"{first_name} and {name} change different modules, so their base fingerprints cover different "
                "weights and cannot be compared; pass the base model (--model BASE) to check both against it"
            )
        if not first.base_fingerprint or not diff.base_fingerprint:
            # Comparing "none" with a fingerprint would read as "a different base"; two nones, as the same.
            unverified, other = (first_name, name) if not first.base_fingerprint else (name, first_name)
            refuse_unverified(f"{unverified}: the diff records no base fingerprint, so nothing shows it is of the same "
                              f"base as {other}", "compose or compare", allow_unverified_base)
        else:
            check_same_fingerprint(first, first_name, diff, name)
        for module, shape in diff.shapes.items():
            if tuple(shape) != tuple(first.shapes[module]):
                raise ShapeMismatchError(
                    f"{module} has shape {tuple(first.shapes[module])} in {first_name} but {tuple(shape)} in {name}"
                )


def check_same_fingerprint(first: SparseDiff, first_name: str, diff: SparseDiff, name: str) -> None:
    """Two diffs of the same modules, each recording a fingerprint, record the same one for a common dtype."""
    a, b = first.base_fingerprint, diff.base_fingerprint
    common = set(a) & set(b)
    differing = sorted(d for d in common if a[d] != b[d])
    if differing or not common:
        raise FingerprintMismatchError(
            f"{name} was made for a different base than {first_name} "
            f"(base fingerprints differ: {first_name} records {_short(a)}, {name} records {_short(b)}; "
            f"bases: {first.base_model or 'unnamed'} vs {diff.base_model or 'unnamed'}); "
            "only diffs of the same base can be composed or compared"
        )


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{module name: weight}`` of every linear layer: what ``base_weights`` takes."""
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def check_quantize_has_model(model_name: str | None, quantize: str | None) -> None:
    if quantize and model_name is None:
        raise ConfigError(f"quantize={quantize!r} (--quantize) quantizes the base model: give it with --model")


def base_weights_of(
    model_name: str | None, dtype: str = "float32", quantize: str | None = None, quantize_skip: Sequence[str] = (),
) -> dict[str, torch.Tensor] | None:
    """``linear_weights`` of the named base model (loaded once, weight-only quantized with ``quantize`` but for
    the layers ``quantize_skip`` names, as a diff's training run over it did: the weights its fingerprint
    covers), or None without a name."""
    check_quantize_has_model(model_name, quantize)
    if model_name is None:
        return None
    from .methods.registry import load_base

    return linear_weights(load_base(model_name, dtype, quantize, quantize_skip))


def _short(prints: dict[str, str]) -> str:
    return "{" + ", ".join(f"{d}: {p[:12]}…" for d, p in sorted(prints.items())) + "}" if prints else "none"


def parse_weights(text: str | None, count: int) -> list[float]:
    """``"1,0.5"`` -> ``[1.0, 0.5]``; ``None`` -> all ones. The count must match the number of diffs."""
    if text is None:
        return [1.0] * count
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--weights must be comma-separated numbers (e.g. 1,0.5), got {text!r}") from None
    if len(weights) != count:
        raise ConfigError(f"--weights gives {len(weights)} weight(s) for {count} diff(s); give one per diff")
    if not all(torch.isfinite(torch.tensor(weights))):
        raise ConfigError(f"--weights must be finite numbers, got {text!r}")
    return weights


# ---------------------------------------------------------------- compose


@dataclass
class ComposeReport:
    """What ``compose`` did: entry counts and where the inputs met."""

    inputs: list[dict[str, Any]]  # name, weight, entries
    union_entries: int  # distinct (module, index) entries over all inputs
    shared_entries: int  # entries present in two or more inputs
    sign_conflicts: int  # shared entries whose weighted contributions have opposite signs
    cancelled_entries: int  # entries whose weighted sum is exactly 0, dropped from the output
    output_entries: int
    value_dtype: str
    per_module: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compose(
    diffs: Sequence[SparseDiff],
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    value_dtype: str | None = None,
    base_weights: dict[str, torch.Tensor] | None = None,
    allow_unverified_base: bool = False,
) -> tuple[SparseDiff, ComposeReport]:
    """One diff whose entries are the union of ``diffs``' and whose values are ``sum_i weights[i] * values_i``.

    Sums are taken in float64 and stored in ``value_dtype`` (default: the inputs' dtype when they agree,
    else float32). Entries that sum to exactly 0 are dropped. Raises ``FingerprintMismatchError`` /
    ``ShapeMismatchError`` before computing anything when the diffs do not share a base. Diffs that change
    different modules need ``base_weights`` (``linear_weights(base)``): each is checked against the base,
    and the output's fingerprint is taken over the union of their modules (``allow_unverified_base``: an input
    that records none is accepted with a warning, see ``check_same_base``).

    Example:
        >>> merged, report = compose([read_diff("a"), read_diff("b")], weights=[1.0, 0.5])  # doctest: +SKIP
        >>> report.shared_entries, report.sign_conflicts  # doctest: +SKIP
    """
    if not diffs:
        raise ConfigError("compose needs at least one diff")
    names = list(names or [f"diff {i}" for i in range(len(diffs))])
    weights = [1.0] * len(diffs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(diffs):
        raise ConfigError(f"{len(weights)} weight(s) for {len(diffs)} diff(s); give one per diff")
    check_same_base(diffs, names, base_weights, allow_unverified_base)
    value_dtype = value_dtype or common_value_dtype(diffs)
    if value_dtype not in DTYPES:
        raise ConfigError(f"value_dtype must be one of {sorted(DTYPES)}, got {value_dtype!r}")

    masks, values, shapes, per_module = {}, {}, {}, {}
    modules = sorted(set().union(*(d.masks for d in diffs)))
    for module in modules:
        parts = [(d.masks[module], d.values[module], w) for d, w in zip(diffs, weights) if module in d.masks]
        indices, summed, stats = sum_entries(parts)
        check_fits(module, summed, value_dtype)
        masks[module], values[module] = indices, summed.to(DTYPES[value_dtype])
        shapes[module] = next(tuple(d.shapes[module]) for d in diffs if module in d.shapes)
        per_module[module] = stats

    first = diffs[0]
    out = SparseDiff(
        config=composed_config(first.config, modules, sum(m.numel() for m in masks.values()), value_dtype),
        masks=masks,
        values=values,
        shapes=shapes,
        base_model=first.base_model,
        base_fingerprint=(
            fingerprints({n: base_weights[n] for n in modules}) if base_weights is not None else dict(first.base_fingerprint)
        ),
        provenance={"composed_from": [{"diff": n, "weight": w} for n, w in zip(names, weights)],
                    **base_as_trained(diffs)},
    )
    totals = {key: sum(s[key] for s in per_module.values()) for key in ("union", "shared", "sign_conflicts", "cancelled")}
    report = ComposeReport(
        inputs=[{"name": n, "weight": w, "entries": d.num_entries} for n, w, d in zip(names, weights, diffs)],
        union_entries=totals["union"],
        shared_entries=totals["shared"],
        sign_conflicts=totals["sign_conflicts"],
        cancelled_entries=totals["cancelled"],
        output_entries=out.num_entries,
        value_dtype=value_dtype,
        per_module=per_module,
    )
    return out, report


def check_fits(module: str, summed: torch.Tensor, value_dtype: str) -> None:
    """The weighted sums of ``module`` are finite once stored in ``value_dtype``; else a ConfigError that says so
    (writing would otherwise report Inf values in the output, as if the inputs held them)."""
    if bool(torch.isfinite(summed.to(DTYPES[value_dtype])).all()):
        return
    largest, limit = float(summed.abs().max()), torch.finfo(DTYPES[value_dtype]).max
    wider = " or store float32 values (--value-dtype float32)" if value_dtype != "float32" else ""
    raise ConfigError(
        f"the weighted sum of {module} reaches {largest:.4g}, beyond what {value_dtype} values hold (at most "
        f"{limit:.4g}); use smaller weights (--weights){wider}"
    )


def base_as_trained(diffs: Sequence[SparseDiff]) -> dict[str, Any]:
    """``{"base_as_trained": {dtype, quantize, quantize_skip}}`` when every input records the same: how the
    base was loaded for them, so commands given ``--quantize`` rebuild it for the composed diff too (a mixed
    base's skipped layers, ``recorded_skip``); empty when they record none or differ (their fingerprints,
    already checked, say the base is one; these facts only word later refusals and rebuild a mixed base)."""
    facts = [(trained_over(d.provenance), frozenset(trained_skip(d.provenance))) for d in diffs]
    if facts[0] == ((None, None), frozenset()) or any(f != facts[0] for f in facts):
        return {}
    (dtype, quantize), _ = facts[0]
    skip = trained_skip(diffs[0].provenance)
    return {"base_as_trained": {"dtype": dtype, "quantize": quantize, "quantize_skip": skip}}


def sum_entries(parts: list[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Sorted union of the parts' indices, their weighted sums (exact zeros dropped), and overlap counts."""
    indices = torch.cat([idx.to(torch.long) for idx, _, _ in parts])
    contributions = torch.cat([vals.to(torch.float64) * w for _, vals, w in parts])
    union, slot = torch.unique(indices, sorted=True, return_inverse=True)
    summed = torch.zeros(union.numel(), dtype=torch.float64).index_add_(0, slot, contributions)
    count = torch.zeros(union.numel(), dtype=torch.long).index_add_(0, slot, torch.ones_like(slot))
    has_pos = torch.zeros(union.numel(), dtype=torch.bool).index_put_((slot,), contributions > 0, accumulate=True)
    has_neg = torch.zeros(union.numel(), dtype=torch.bool).index_put_((slot,), contributions < 0, accumulate=True)
    keep = summed != 0
    stats = {
        "union": int(union.numel()),
        "shared": int((count > 1).sum()),
        "sign_conflicts": int((has_pos & has_neg).sum()),
        "cancelled": int((~keep).sum()),
    }
    return union[keep], summed[keep], stats


def common_value_dtype(diffs: Sequence[SparseDiff]) -> str:
    dtypes = {d.config.value_dtype for d in diffs}
    return dtypes.pop() if len(dtypes) == 1 else "float32"


def composed_config(first: SparseConfig, modules: list[str], entries: int, value_dtype: str) -> SparseConfig:
    """The first input's selection settings, with the union's modules and entry count (at least 1,
    as SparseConfig requires, even when every entry cancelled)."""
    data = first.to_dict()
    data.update(density=None, num_params=max(1, entries), target_modules=modules, value_dtype=value_dtype)
    return SparseConfig.from_dict(data)


# ---------------------------------------------------------------- compare


@dataclass
class OverlapStats:
    """How two diffs of one base overlap."""

    entries_a: int
    entries_b: int
    shared_entries: int
    jaccard: float  # shared / union; 1.0 for two empty diffs
    cosine_shared: float | None  # cosine of the two value vectors on shared entries; None when none are shared
    sign_agreement: float | None  # share of shared entries whose values have the same sign
    per_module: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def overlap_stats(
    a: SparseDiff, b: SparseDiff, names: Sequence[str] = ("A", "B"), base_weights: dict[str, torch.Tensor] | None = None,
    allow_unverified_base: bool = False,
) -> OverlapStats:
    """Entries shared by ``a`` and ``b``, their Jaccard index, per-module overlap and the cosine of the values
    on shared entries (how alike the two updates are where they touch the same weights). ``base_weights`` and
    ``allow_unverified_base`` as for ``compose``: needed when the two change different modules."""
    check_same_base([a, b], names, base_weights, allow_unverified_base)
    shared_a, shared_b, per_module = [], [], {}
    for module in sorted(set(a.masks) | set(b.masks)):
        va, vb = shared_values(a, b, module)
        k_a, k_b = _k(a, module), _k(b, module)
        union = k_a + k_b - va.numel()
        per_module[module] = {
            "entries_a": k_a,
            "entries_b": k_b,
            "shared": int(va.numel()),
            "jaccard": va.numel() / union if union else 1.0,
            "cosine_shared": cosine(va, vb),
        }
        shared_a.append(va)
        shared_b.append(vb)
    va, vb = torch.cat(shared_a), torch.cat(shared_b)
    shared = int(va.numel())
    union = a.num_entries + b.num_entries - shared
    return OverlapStats(
        entries_a=a.num_entries,
        entries_b=b.num_entries,
        shared_entries=shared,
        jaccard=shared / union if union else 1.0,
        cosine_shared=cosine(va, vb),
        sign_agreement=float((torch.sign(va) == torch.sign(vb)).double().mean()) if shared else None,
        per_module=per_module,
    )


def _k(diff: SparseDiff, module: str) -> int:
    return int(diff.masks[module].numel()) if module in diff.masks else 0


def shared_values(a: SparseDiff, b: SparseDiff, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Values of ``a`` and ``b`` on the entries of ``module`` both hold, aligned (indices are sorted in a diff)."""
    if module not in a.masks or module not in b.masks:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, empty
    in_b = torch.isin(a.masks[module], b.masks[module])
    in_a = torch.isin(b.masks[module], a.masks[module])
    return a.values[module][in_b].to(torch.float64), b.values[module][in_a].to(torch.float64)


def cosine(x: torch.Tensor, y: torch.Tensor) -> float | None:
    if x.numel() == 0:
        return None
    norm = float(x.norm() * y.norm())
    return float(x @ y) / norm if norm > 0 else 0.0


# ---------------------------------------------------------------- text


def format_compose_report(report: ComposeReport, out: str) -> str:
    lines = [f"{'input':<40} {'weight':>8} {'entries':>12}"]
    lines += [f"{i['name']:<40} {i['weight']:>8g} {i['entries']:>12,}" for i in report.inputs]
    lines += [
        "",
        f"union of entries      {report.union_entries:>12,}",
        f"shared by 2+ inputs   {report.shared_entries:>12,}",
        f"sign conflicts        {report.sign_conflicts:>12,}  (shared entries pushed in opposite directions)",
        f"cancelled to 0        {report.cancelled_entries:>12,}  (dropped: they change nothing)",
        f"written               {report.output_entries:>12,}  ({report.value_dtype} values) -> {out}",
    ]
    return "\n".join(lines)


def format_overlap(stats: OverlapStats, names: Sequence[str] = ("A", "B")) -> str:
    def num(x):
        return "-" if x is None else f"{x:.4f}"

    lines = [
        f"entries {names[0]}: {stats.entries_a:,}   entries {names[1]}: {stats.entries_b:,}",
        f"shared entries: {stats.shared_entries:,}   Jaccard: {stats.jaccard:.4f}   "
        f"cosine on shared: {num(stats.cosine_shared)}   same sign: {num(stats.sign_agreement)}",
        "",
        f"{'module':<48} {'A':>9} {'B':>9} {'shared':>9} {'Jaccard':>8} {'cosine':>8}",
    ]
    for module, m in stats.per_module.items():
        lines.append(
            f"{module:<48} {m['entries_a']:>9,} {m['entries_b']:>9,} {m['shared']:>9,} "
            f"{m['jaccard']:>8.4f} {num(m['cosine_shared']):>8}"
        )
    return "\n".join(lines)
