"""sparseft compose: sum several diffs of one base (with weights) into one diff, with an overlap report."""

from __future__ import annotations

import json

from ..config import VALUE_DTYPES
from .options import add_model_options, add_quantize_option, add_unverified_base_option

# Also used by diff-stats.
CHECK_EVERY_DIFF = ("check every diff against it; needed when the diffs change different modules, whose recorded "
                    "fingerprints cover different weights")


def add_parser(sub):
    p = sub.add_parser(
        "compose",
        help="combine diffs of the same base into one (weighted sum of values over the union of entries)",
        description="Write one diff whose entries are the union of the inputs' and whose values are "
        "w1*A + w2*B + ...: merging it equals merging the inputs one after another, scaled. Use it to stack a "
        "style diff on a task diff (--weights 1,1), to soften one (--weights 1,0.5) or to subtract one "
        "(--weights 1,-1: entries that cancel to exactly 0 are dropped). All inputs must be of one base: the "
        "same recorded fingerprint, or each checked against --model (needed when they change different modules); "
        "the report counts shared entries and sign conflicts (shared entries the inputs push in "
        "opposite directions, where the sum is a compromise neither diff learnt).",
        epilog="example: sparseft compose runs/task runs/style --weights 1,0.5 --out runs/task+style",
    )
    p.add_argument("diffs", nargs="+", metavar="DIFF",
                   help="diff directories or Hub ids org/name[@rev] (two or more, or one to rescale)")
    p.add_argument("--weights", metavar="W1,W2,...", help="one weight per diff, comma-separated (default: all 1)")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the composed diff")
    p.add_argument(
        "--value-dtype", choices=VALUE_DTYPES,
        help="dtype of the stored values (default: the inputs' dtype when they agree, else float32)",
    )
    add_model_options(p, required=False, why=CHECK_EVERY_DIFF)
    add_quantize_option(p, "check against", "diffs trained with the same --quantize and --dtype; needs --model")
    add_unverified_base_option(p, "compose a diff")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return p


def run(args) -> int:
    from ..atomic import check_out_dir
    from ..compose import base_weights_of, check_quantize_has_model, compose, format_compose_report, parse_weights
    from ..diffio import read_diff, recorded_skip, write_diff
    from ..hub import resolve_diff

    check_out_dir(args.out, inputs=[*args.diffs, args.model])  # a composed diff written over an input loses it
    weights = parse_weights(args.weights, len(args.diffs))
    check_quantize_has_model(args.model, args.quantize)  # before any diff is read or downloaded
    paths = [resolve_diff(path) for path in args.diffs]
    diffs = [read_diff(path) for path in paths]  # the report names them as given
    base = base_weights_of(args.model, args.dtype, args.quantize, recorded_skip(paths, args.quantize))
    composed, report = compose(diffs, weights, names=args.diffs, value_dtype=args.value_dtype, base_weights=base,
                               allow_unverified_base=args.allow_unverified_base)
    write_diff(composed, args.out)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_compose_report(report, args.out))
    return 0
