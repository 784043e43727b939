"""sparseft diff-stats: how two diffs of one base overlap (entries, Jaccard, per module, cosine of values)."""

from __future__ import annotations

import json

from .compose import CHECK_EVERY_DIFF
from .options import add_model_options, add_quantize_option, add_unverified_base_option


def add_parser(sub):
    p = sub.add_parser(
        "diff-stats",
        help="compare two diffs of the same base: shared entries, Jaccard, per-module overlap, cosine",
        description="Count the entries A and B both change, their Jaccard index (shared / union), the same per "
        "module, and the cosine and sign agreement of their values on the shared entries. High overlap with "
        "negative cosine means composing them will partly cancel; near-zero overlap means they compose "
        "without interfering. Both diffs must be of one base: the same recorded fingerprint, or both checked "
        "against --model.",
        epilog="example: sparseft diff-stats runs/seed0 runs/seed1 --json",
    )
    p.add_argument("a", metavar="A", help="first diff: a directory or a Hub id org/name[@rev]")
    p.add_argument("b", metavar="B", help="second diff: a directory or a Hub id org/name[@rev]")
    add_model_options(p, required=False, why=CHECK_EVERY_DIFF)
    add_quantize_option(p, "check against", "diffs trained with the same --quantize and --dtype; needs --model")
    add_unverified_base_option(p, "compare a diff")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def run(args) -> int:
    from ..compose import base_weights_of, format_overlap, overlap_stats
    from ..diffio import read_diff, recorded_skip
    from ..hub import resolve_diff

    names = (args.a, args.b)
    paths = [resolve_diff(args.a), resolve_diff(args.b)]
    a, b = map(read_diff, paths)
    base = base_weights_of(args.model, args.dtype, args.quantize, recorded_skip(paths, args.quantize))
    stats = overlap_stats(a, b, names, base_weights=base, allow_unverified_base=args.allow_unverified_base)
    print(json.dumps(stats.to_dict(), indent=2) if args.json else format_overlap(stats, names))
    return 0
