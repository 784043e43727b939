"""sparseft report RESULTS.json: the decision maker's page (Markdown, optionally HTML) from a bench run."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser(
        "report",
        help="write the cost report (quality kept, time/memory saved, storage per tenant) from results.json",
        description="Read a results.json written by `sparseft bench` and write a Markdown page (and with --html "
        "an HTML page) comparing sparse, LoRA and full fine-tuning; every figure cites its row id.",
    )
    p.add_argument("results", metavar="RESULTS.json", help="results.json written by sparseft bench")
    p.add_argument("--out", default=None, metavar="report.md", help="where to write the Markdown page, a .md path (default: report.md next to RESULTS.json)")
    p.add_argument("--html", action="store_true",
                   help="also write an HTML page beside the Markdown page, with suffix .html")
    return p


def run(args) -> int:
    from ..atomic import given_path
    from ..bench import write_report

    given_path(args.results, "RESULTS.json", what="the results.json sparseft bench wrote")  # "" was read as "."
    for path in write_report(args.results, args.out, html_page=args.html):  # which checks --out first
        print(f"wrote {path}")
    return 0
