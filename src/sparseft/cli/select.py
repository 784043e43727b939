"""sparseft select: score the entries of a model on calibration data and write a reusable mask file."""

from __future__ import annotations

import json

from ..config import DTYPES


def add_parser(sub):
    p = sub.add_parser(
        "select",
        help="choose which weight entries to train and write them to a mask file",
        description="Score every entry of the targeted weights (on calibration batches from --data for the "
        "gradient, fisher, taylor and combined scorers), keep the top ones within the budget and write a "
        "mask file that `sparseft train --masks` takes. Prints where the budget landed per module.",
    )
    p.add_argument("--model", required=True, help="base model: alias (e.g. smollm2-135m), local directory or HF id")
    p.add_argument("--data", help="training data (JSONL/CSV/parquet of {prompt, completion} or {messages} rows, "
                   "as for `sparseft train`); needed by the data-driven scorers")
    p.add_argument("--out", required=True, metavar="MASKS.safetensors", help="where to write the mask file")
    p.add_argument("--density", type=float, default=0.01, help="share of targeted entries to train (default 0.01)")
    p.add_argument("--num-params", type=int, help="exact number of entries to train (instead of --density)")
    p.add_argument("--scorer", default="combined", help="random, magnitude, gradient, fisher, taylor, combined")
    p.add_argument("--allocation", default="proportional", help="global, proportional or per_module")
    p.add_argument("--target-modules", help="comma-separated module names (default: all Llama projections)")
    p.add_argument("--calibration-batches", type=int, default=8, help="batches for gradient statistics")
    p.add_argument("--batch-size", type=int, default=4, help="rows per calibration batch")
    p.add_argument("--max-length", type=int, default=256, help="tokens per row (longer rows are cut)")
    p.add_argument("--seed", type=int, default=0, help="seeds the random scorer and the order of calibration rows")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype to load the model in (default: float32)")
    p.add_argument("--json", action="store_true", help="print the per-module budget as JSON")
    return p


def make_config(args):
    from ..config import SparseConfig

    fields = dict(
        density=args.density,
        num_params=args.num_params,
        scorer=args.scorer,
        allocation=args.allocation,
        calibration_batches=args.calibration_batches,
        seed=args.seed,
    )
    if args.target_modules:
        fields["target_modules"] = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    return SparseConfig(**fields)


def run(args) -> int:
    from ..errors import ConfigError
    from ..loading import load_model, load_tokenizer
    from ..selection import budget_report, format_budget_report, get_scorer, save_masks, select
    from ..targets import find_targets
    from ..loading import pad_token_id
    from ..training.data import calibration_batches, load_examples

    cfg = make_config(args)
    batches = None
    if get_scorer(cfg.scorer).needs_data_for(cfg.scorer_weights):
        if not args.data:
            raise ConfigError(f"scorer {cfg.scorer!r} needs calibration data; pass --data FILE")
        tokenizer = load_tokenizer(args.model)
        examples = load_examples(args.data, tokenizer, args.max_length, truncation=True)
        # The same first batches `sparseft train` calibrates on with the same seed and batch size.
        batches = calibration_batches(examples, args.batch_size, pad_token_id(tokenizer), cfg.seed, cfg.calibration_batches)
    model = load_model(args.model, dtype=args.dtype)
    masks = select(model, cfg, batches)
    targets = find_targets(model, cfg.target_modules)
    save_masks(args.out, masks, {n: tuple(targets[n].weight.shape) for n in masks}, cfg, base_model=str(args.model))
    report = budget_report(masks, {n: targets[n].weight.numel() for n in masks})
    if args.json:
        print(json.dumps({"out": args.out, "calibration_batches": len(batches or []), "modules": report}, indent=2))
    else:
        print(format_budget_report(report))
        used = f" on {len(batches)} calibration batches" if batches else ""
        print(f"scorer={cfg.scorer} allocation={cfg.allocation}{used} -> {args.out}")
    return 0
