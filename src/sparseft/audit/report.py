"""The audit's verdict and its two files: ``audit.json`` (everything) and ``audit.md`` (for people)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TOP_ROWS = 10


@dataclass
class Thresholds:
    """Gate limits. The defaults are conservative starting points, not calibrated values: a diff for a
    narrow task should barely move general prompts; tighten or loosen them for your own probe set.

    max_kl: limit on the mean next-token KL(base ‖ fine-tuned) over all probe prompts, in nats.
    min_agreement: least share of prompts whose top-1 next token is unchanged.
    max_pair_drift: limit on the largest |change| of a pair's target log-prob gap, in nats.
    """

    max_kl: float = 0.5
    min_agreement: float = 0.8
    max_pair_drift: float = 1.0


def summarize(prompts: list[dict], pairs: list[dict]) -> dict[str, Any]:
    worst = max(prompts, key=lambda r: r["kl"])
    summary = {
        "num_prompts": len(prompts),
        "num_pairs": len(pairs),
        "kl_mean": sum(r["kl"] for r in prompts) / len(prompts),
        "kl_max": worst["kl"],
        "kl_max_probe": f"{worst['probe']} ({worst['member']})",
        "top1_agreement": sum(r["agree"] for r in prompts) / len(prompts),
    }
    if pairs:
        worst_pair = max(pairs, key=lambda r: abs(r["drift"]))
        summary["pair_drift_max_abs"] = abs(worst_pair["drift"])
        summary["pair_drift_max_probe"] = worst_pair["probe"]
    return summary


def gates(summary: dict[str, Any], limits: Thresholds) -> list[dict[str, Any]]:
    """Each gate with its value, limit and verdict; the pair gate only when the set has pairs."""
    found = [
        {"gate": "kl_mean", "value": summary["kl_mean"], "limit": limits.max_kl, "op": "<=",
         "ok": summary["kl_mean"] <= limits.max_kl},
        {"gate": "top1_agreement", "value": summary["top1_agreement"], "limit": limits.min_agreement, "op": ">=",
         "ok": summary["top1_agreement"] >= limits.min_agreement},
    ]
    if "pair_drift_max_abs" in summary:
        drift = summary["pair_drift_max_abs"]
        found.append({"gate": "pair_drift", "value": drift, "limit": limits.max_pair_drift, "op": "<=",
                      "ok": drift <= limits.max_pair_drift})
    return found


def build_report(meta: dict[str, Any], prompts: list[dict], pairs: list[dict], limits: Thresholds) -> dict[str, Any]:
    summary = summarize(prompts, pairs)
    checked = gates(summary, limits)
    return {
        **meta,
        "passed": all(g["ok"] for g in checked),
        "thresholds": asdict(limits),
        "gates": checked,
        "summary": summary,
        "prompts": prompts,
        "pairs": pairs,
    }


def add_reproducibility(report: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Attach a ``repro.reproduce`` result as one more gate: the re-run must give the same bytes."""
    ok = bool(result["reproduced"])
    report["gates"].append({"gate": "reproduced", "value": float(ok), "limit": 1.0, "op": "==", "ok": ok})
    report["reproducibility"] = result
    report["passed"] = report["passed"] and ok
    return report


def cell(text: Any, width: int = 60) -> str:
    """Table-safe text: one line, pipes escaped, shortened."""
    text = str(text).replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def token_label(row: dict, side: str) -> str:
    text = row.get(f"{side}_text")
    return f"{row[side]} {cell(repr(text), 20)}" if text is not None else str(row[side])


def format_markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [
        f"# Audit of `{report['diff']}`",
        "",
        f"**{'PASS' if report['passed'] else 'FAIL'}** — base `{report['model']}`, probes `{report['probe_file']}` "
        f"({s['num_prompts']} prompts, {s['num_pairs']} pairs)",
        "",
        "| gate | value | limit | result |",
        "| --- | --- | --- | --- |",
        *(f"| {g['gate']} | {g['value']:.4g} | {g['op']} {g['limit']:g} | {'pass' if g['ok'] else '**FAIL**'} |"
          for g in report["gates"]),
        "",
        f"Next-token KL(base ‖ fine-tuned): mean {s['kl_mean']:.4g}, max {s['kl_max']:.4g} at {s['kl_max_probe']}. "
        f"Top-1 agreement: {s['top1_agreement']:.1%}.",
        "",
        f"## Prompts that moved most (top {TOP_ROWS} by KL)",
        "",
        "| probe | member | prompt | KL | top-1 base | top-1 fine-tuned |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(report["prompts"], key=lambda r: -r["kl"])[:TOP_ROWS]:
        lines.append(f"| {cell(r['probe'], 24)} | {r['member']} | {cell(r['text'])} | {r['kl']:.4g} | "
                     f"{token_label(r, 'top1_base')} | {token_label(r, 'top1_tuned')} |")
    if report["pairs"]:
        lines += [
            "",
            "## Pairs (bias drift): gap = log p(target | prompt) − log p(target | pair)",
            "",
            "| probe | prompt | pair | target | gap before | gap after | drift |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in sorted(report["pairs"], key=lambda r: -abs(r["drift"])):
            target = r["target"] or f"({r['target_source']}: {r['target_token']})"
            lines.append(f"| {cell(r['probe'], 24)} | {cell(r['prompt'], 40)} | {cell(r['pair'], 40)} | "
                         f"{cell(target, 24)} | {r['gap_before']:+.4f} | {r['gap_after']:+.4f} | {r['drift']:+.4f} |")
    if "reproducibility" in report:
        from .repro import format_repro

        lines += format_repro(report["reproducibility"])
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``audit.json`` and ``audit.md`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "audit.json", out / "audit.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(format_markdown(report))
    return json_path, md_path
