"""sparseft inspect DIR: what a diff changes, where, by how much, and what it costs on disk."""

from __future__ import annotations

import argparse
import json


def plot_path(text: str) -> str:
    """argparse ``type=`` of --plot: refuse an extension matplotlib does not write, or a path that cannot be
    created, before the diff is read."""
    from ..audit.heatmap import check_plot_path
    from ..errors import ConfigError

    try:
        check_plot_path(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_parser(sub):
    p = sub.add_parser(
        "inspect",
        help="show per-module/layer counts, value statistics, outliers, size and provenance of a diff",
        description="Validate a diff directory and print where its entries sit (per module, layer, module type "
        "and attention vs MLP), their values and outliers, the bytes per entry on disk, the base fingerprint "
        "and how the diff was made.",
    )
    p.add_argument("diff", metavar="DIR", help="diff directory written by save_pretrained / sparseft train")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--plot", metavar="FILE.png", type=plot_path,
                   help="also write a heat map (layer × module type) to this file: .png, .pdf or .svg")
    return p


def run(args) -> int:
    from ..audit import format_inspection, inspect_diff, plot_heatmap

    report = inspect_diff(args.diff)
    print(json.dumps(report, indent=2) if args.json else format_inspection(report))
    if args.plot:
        plot_heatmap(report, args.plot)
        if not args.json:
            print(f"\nheat map -> {args.plot}")
    return 0
