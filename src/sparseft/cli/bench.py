"""sparseft bench CONFIG.yaml: full FT vs LoRA vs sparse side by side → results.json, results.md, plots."""

from __future__ import annotations

import shlex
import sys

from ..errors import ConfigError


def add_parser(sub):
    p = sub.add_parser(
        "bench",
        help="run a grid of full / LoRA / sparse fine-tuning runs on the same data and compare them",
        description="Train every row of CONFIG (same data, seed and steps), each in a fresh process, evaluate "
        "it on the task's eval split, and write results.json (after every row), results.md, plots/*.png and "
        "report.md into --out. A failing row is recorded as failed; the grid goes on (exit status 1 when any row "
        "failed, 2 for a bad config).",
    )
    p.add_argument("config", metavar="CONFIG.yaml", help="bench config (see examples/bench/)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: runs/bench-<name>)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="what ${SPARSEFT_DATA} in the config means (default: $SPARSEFT_DATA or ../shared/data)")
    p.add_argument("--only", action="append", default=None, metavar="ROW_ID",
                   help="run only this row (repeat for several; 'base' is the base model's evaluation), e.g. to "
                   "time one row again on a quiet machine")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue a grid cut short in --out: rows that finished ok with the same spec, training "
                       "rows and machine are kept, the others run")
    again.add_argument("--overwrite", action="store_true", help="start over in an --out that holds earlier results")
    p.add_argument("--any-machine", action="store_true",
                   help="with --resume: also keep rows measured on another machine (a long grid spread over sessions "
                   "on different machines); their scores stand, each row records its machine, and results.md names "
                   "the machines, since times compare only within one")
    p.add_argument("--stage", choices=["validation", "test"], default=None,
                   help="run one stage of the protocol (the config needs validation_task, validation_data and "
                   "seeds): 'validation' scores every row (each lr of each grid) on the validation split into "
                   "OUT/validation; 'test' runs, per method, the best validation row once per seed on the test "
                   "split into OUT/test, with mean ± std and paired bootstrap intervals (sparse − LoRA, sparse − full)")
    p.add_argument("--no-report", action="store_true", help="skip report.md at the end")
    return p


def run(args) -> int:
    from ..bench import load_bench_config, run_grid, write_report
    from ..bench.config import only_rows

    if args.any_machine and not args.resume:
        raise ConfigError("--any-machine goes with --resume: it says which earlier rows to keep")
    cfg = load_bench_config(args.config, data_root=args.data_root)
    if args.only and args.stage == "test":
        raise ConfigError("--only applies to the validation stage; the test stage runs the chosen rows of every method")
    if args.only:
        cfg = only_rows(cfg, args.only)
    out = args.out if args.out is not None else f"runs/bench-{cfg.name}"  # "" is refused, not the default
    command = "sparseft " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"] else ""
    command = command or f"sparseft bench {args.config} --out {out}" + (f" --stage {args.stage}" if args.stage else "")
    if args.stage:
        from ..bench.protocol import run_stage, stage_dir

        results = run_stage(cfg, args.stage, out, command=command, resume=args.resume, overwrite=args.overwrite,
                            any_machine=args.any_machine)
        out = str(stage_dir(out, args.stage))
    else:
        results = run_grid(cfg, out, command=command, resume=args.resume, overwrite=args.overwrite,
                           any_machine=args.any_machine)
    if not args.no_report:
        write_report(f"{out}/results.json", html_page=True)
    failed = [r["id"] for r in results["rows"] if r["status"] != "ok"]
    print(f"wrote {out}/results.json, results.md, plots/, report.md ({len(results['rows'])} rows"
          + (f"; failed: {', '.join(failed)})" if failed else ")"))
    return 1 if failed else 0
