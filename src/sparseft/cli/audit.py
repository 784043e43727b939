"""sparseft audit: base vs fine-tuned on a probe set (KL, top-1 agreement, pair drift); exit 1 past a limit."""

from __future__ import annotations

from .options import add_model_options, add_quantize_option, add_unverified_base_option, positive_int


def add_parser(sub):
    from ..audit.report import Thresholds

    limits = Thresholds()
    p = sub.add_parser(
        "audit",
        help="measure how a diff changes the model's behaviour on probe prompts; fail past set limits",
        description="Run the base and base + diff on a probe set and report the next-token KL divergence, top-1 "
        "agreement and, for probes with a 'pair', how the gap between the pair's outputs changed (bias drift). "
        "Writes audit.json and audit.md. Exit 0 when every gate passes, 1 when one fails, 2 on bad input.",
    )
    add_model_options(p)
    add_quantize_option(p, "audit over", "a diff trained with the same --quantize and --dtype, run unmerged over it; "
                        "the base pass runs over the same quantized base")
    p.add_argument("--diff", required=True, metavar="DIR", help="diff directory")
    p.add_argument("--probe", metavar="FILE.jsonl", help="probe set (default: the set shipped with sparseft)")
    p.add_argument("--max-kl", type=float, default=limits.max_kl,
                   help=f"limit on the mean next-token KL(base ‖ fine-tuned), nats (default {limits.max_kl})")
    p.add_argument("--min-agreement", type=float, default=limits.min_agreement,
                   help=f"least share of prompts with unchanged top-1 token (default {limits.min_agreement})")
    p.add_argument("--max-pair-drift", type=float, default=limits.max_pair_drift,
                   help=f"limit on the largest |change| of a pair's log-prob gap, nats (default {limits.max_pair_drift})")
    p.add_argument("--out", metavar="DIR", help="where to write audit.json and audit.md (default: DIFF_DIR-audit)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts per forward pass (default 8)")
    p.add_argument("--repro", action="store_true",
                   help="also re-run the diff's training from its recorded config and seed on CPU and check that "
                   "the tensor file has the recorded sha256 (or report which modules differ)")
    p.add_argument("--repro-data", metavar="FILE", help="training data for --repro when not at the recorded path")
    add_unverified_base_option(p, "audit a diff")
    return p


def check_inputs(args) -> None:
    """The diff and the data files exist, the diff reads and the report has somewhere to go, before time goes
    into loading the model (and, with --repro, training it again)."""
    from ..atomic import check_dir_to_write_into
    from ..diffio import read_diff
    from ..files import existing_data

    if args.out is not None:
        check_dir_to_write_into(args.out)
    read_diff(args.diff)
    for path, flag in ((args.probe, "--probe"), (args.repro_data, "--repro-data")):
        if path is not None:  # "" too: it had fallen back to the shipped probes or the recorded data, unsaid
            existing_data(path, flag)
    if args.repro:  # the recorded training config, read and checked now, not after the whole audit has run
        from ..audit.repro import rerun_values

        rerun_values(args.diff, args.model, args.repro_data)


def run(args) -> int:
    from pathlib import Path

    from ..audit.behaviour import audit_diff
    from ..audit.report import Thresholds, write_report
    from ..diffio import recorded_skip
    from ..loading import load_tokenizer
    from ..methods.registry import load_base

    check_inputs(args)
    model = load_base(args.model, args.dtype, args.quantize, recorded_skip([args.diff], args.quantize))
    limits = Thresholds(args.max_kl, args.min_agreement, args.max_pair_drift)
    report = audit_diff(model, args.diff, args.probe, load_tokenizer(args.model, required=False), limits,
                        args.batch_size, model_name=str(args.model), allow_unverified_base=args.allow_unverified_base)
    # Beside the diff; for a Hub id (resolved into the HF cache) in the working directory instead.
    given = getattr(args, "diff_given", args.diff)
    beside = Path(args.diff).resolve() if Path(given).exists() else Path(Path(given).name).absolute()
    out = Path(args.out) if args.out else Path(str(beside) + "-audit")
    if args.repro:
        from ..audit.repro import reproduce
        from ..audit.report import add_reproducibility

        del model  # the re-run loads its own copy of the base
        add_reproducibility(report, reproduce(args.diff, args.model, args.repro_data, work_dir=out / "rerun"))
    json_path, md_path = write_report(report, out)
    s = report["summary"]
    print(f"KL mean {s['kl_mean']:.4g} (max {s['kl_max']:.4g} at {s['kl_max_probe']}); "
          f"top-1 agreement {s['top1_agreement']:.1%}; {s['num_prompts']} prompts, {s['num_pairs']} pairs")
    for g in report["gates"]:
        verdict = "PASS" if g["ok"] else "FAIL"
        print(f"{verdict} {g['gate']}: {g['value']:.4g} (limit {g['op']} {g['limit']:g})")
    if report.get("reproducibility", {}).get("reason"):
        print(f"  reproducibility: {report['reproducibility']['reason']}")
    print(f"report -> {json_path}, {md_path}")
    return 0 if report["passed"] else 1
