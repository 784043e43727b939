"""The ``sparseft`` command: one verb per module in this package, each a thin layer over the library.

Adding a verb: write ``cli/<verb>.py`` with ``add_parser(subparsers)`` and ``run(args) -> int`` and
add its name to ``VERBS``. A verb with a dash lives in a module with an underscore (``diff-stats`` ->
``diff_stats.py``), and one that is a Python keyword gets a trailing underscore (``import`` -> ``import_.py``).
"""

from __future__ import annotations

import argparse
import importlib
import keyword
import sys

from ..diffio import check_diff_dir
from ..errors import SparseFTError
from ..hub import resolve_diff

VERBS = [
    "demo", "select", "train", "eval", "apply", "compose", "diff-stats", "export", "import",
    "inspect", "verify", "audit", "serve", "bench", "report",
]


def module_name(verb: str) -> str:
    """The module of ``cli/`` that holds ``verb``."""
    name = verb.replace("-", "_")
    return name + "_" if keyword.iskeyword(name) else name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparseft",
        description="Sparse fine-tuning: train the few weight entries that matter, ship a small exact diff.",
        epilog="Run `sparseft VERB --help` for the flags of each verb.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb in VERBS:
        module = importlib.import_module(f"{__name__}.{module_name(verb)}")
        sub_parser = module.add_parser(sub)
        sub_parser.set_defaults(handler=module.run, diff_flag=diff_flag(sub_parser))
    return parser


def diff_flag(parser: argparse.ArgumentParser) -> str | None:
    """The option that gives a verb its one diff (``--diff``), named in the error when it is missing; None
    when the diff is positional (inspect DIR, export DIFF OUT), whose path alone is named."""
    for action in parser._actions:
        if action.dest == "diff" and action.option_strings:
            return action.option_strings[-1]
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if isinstance(getattr(args, "diff", None), str):  # --diff / DIFF: a directory or a Hub id org/name[@rev]
            # Checked here, before any verb loads a base model: a missing diff was named only after the load.
            args.diff_given, args.diff = args.diff, str(check_diff_dir(resolve_diff(args.diff), args.diff_flag))
        return int(args.handler(args) or 0)
    except SparseFTError as e:
        print(f"sparseft {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system said no (a path it cannot create, no permission, disk full): not a bug
        print(f"sparseft {args.verb}: error: {e}", file=sys.stderr)
        return 2
