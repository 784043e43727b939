"""sparseft demo: fine-tune the embedded SmolLM2-135M sparsely on the bundled routing task, before -> after."""

from __future__ import annotations

import json


def add_parser(sub):
    from ..demo import DemoConfig

    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="sparse fine-tuning end to end on the bundled support-ticket routing task (minutes on a CPU)",
        description="Evaluate the base model on the bundled routing test set, fine-tune a sparse diff on its "
        "training set, save it, apply it, evaluate again, revert it and check the base is restored bit for bit.",
    )
    p.add_argument("--model", default=d.model, help=f"base model (default: {d.model})")
    p.add_argument("--out", default=d.out, help=f"where the diff and the report go (default: {d.out})")
    p.add_argument("--density", type=float, default=d.density, help=f"share of projection entries to train (default: {d.density})")
    p.add_argument("--scorer", default=d.scorer, help=f"how entries are chosen (default: {d.scorer})")
    p.add_argument("--epochs", type=float, default=d.epochs, help=f"passes over the training set (default: {d.epochs})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default: {d.lr})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed (default: {d.seed})")
    p.add_argument("--json", action="store_true", help="also print the report as JSON")
    return p


def run(args) -> int:
    from ..demo import DemoConfig, format_report, run_demo

    cfg = DemoConfig(model=args.model, out=args.out, density=args.density, scorer=args.scorer, epochs=args.epochs, lr=args.lr, seed=args.seed)
    report = run_demo(cfg)
    print(format_report(report))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    return 0
