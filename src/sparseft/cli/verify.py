"""sparseft verify: every integrity and compatibility check of a diff, one line each; exit 1 on failure."""

from __future__ import annotations

import json

from .options import add_model_options, add_quantize_option


def add_parser(sub):
    p = sub.add_parser(
        "verify",
        help="check a diff's integrity (hashes, format, indices, dtypes, NaN/Inf) and its fit to a base model",
        description="Run every check and print PASS/FAIL/SKIP per check. Exit 0 when none fails, 1 otherwise "
        "(one 'FAIL <check>: <reason>' line per failed check), 2 on bad input: no directory at --diff, or a base "
        "model that cannot be loaded. "
        "Without --model only the integrity checks run.",
    )
    p.add_argument("--diff", required=True, metavar="DIR", help="diff directory")
    add_model_options(p, required=False, what="base model for the shape and fingerprint checks")
    add_quantize_option(p, "check against", "a diff trained with the same --quantize and --dtype; needs --model")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    return p


def run(args) -> int:
    from ..audit.verify import failed, format_verification, results_json, verify_diff
    from ..diffio import recorded_skip
    from ..errors import ConfigError
    from ..methods.registry import load_base

    if args.quantize and not args.model:
        raise ConfigError("--quantize quantizes the base model: give it with --model (without it only the "
                          "integrity checks run)")
    skip = recorded_skip([args.diff], args.quantize)
    model = load_base(args.model, args.dtype, args.quantize, skip) if args.model else None
    results = verify_diff(args.diff, model)
    print(json.dumps(results_json(results), indent=2) if args.json else format_verification(results))
    return 1 if failed(results) else 0
