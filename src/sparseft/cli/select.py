"""sparseft select: score the entries of a model on calibration data and write a reusable mask file."""

from __future__ import annotations

import json

from ..config import ALLOCATIONS
from .options import TrainConfigDefaults, add_model_options, positive_int


def add_parser(sub):
    p = sub.add_parser(
        "select",
        help="choose which weight entries to train and write them to a mask file",
        description="Score every entry of the targeted weights (on calibration batches from --data for the "
        "gradient, fisher, taylor and combined scorers), keep the top ones within the budget and write a "
        "mask file that `sparseft train --masks` takes. Prints where the budget landed per module. Defaults "
        "are `sparseft train`'s, so with the same flags both calibrate on the same first batches.",
        formatter_class=TrainConfigDefaults,
        argument_default=None,
    )
    add_model_options(p, dtype_default=None)
    p.add_argument("--data", help="training data (JSONL/CSV/parquet of {prompt, completion} or {messages} rows, "
                   "as for `sparseft train`); needed by the data-driven scorers")
    p.add_argument("--out", required=True, metavar="MASKS.safetensors", help="where to write the mask file")
    p.add_argument("--density", type=float, help="share of targeted entries to train")
    p.add_argument("--num-params", type=positive_int, help="exact number of entries to train (instead of --density)")
    p.add_argument("--scorer", help="random, magnitude, gradient, fisher, taylor, combined")
    p.add_argument("--scorer-weights", metavar="NAME=W,...",
                   help="weights of the parts of the combined scorer, e.g. gradient=0.5,fisher=0.5")
    p.add_argument("--allocation", choices=list(ALLOCATIONS), help="how the budget is split over modules")
    p.add_argument("--target-modules", help="comma-separated module names")
    p.add_argument("--calibration-batches", type=positive_int, help="batches for gradient statistics")
    p.add_argument("--batch-size", type=positive_int, help="rows per calibration batch (as train's micro-batch)")
    p.add_argument("--max-length", type=int,
                   help="tokens per row; longer rows are cut, not rejected as train does: scoring only needs "
                   "gradient statistics, and a cut row still gives them")
    p.add_argument("--seed", type=int, help="seeds the random scorer and the order of calibration rows")
    p.add_argument("--json", action="store_true", help="print the per-module budget as JSON")
    return p


# The flags select shares with `sparseft train`: the TrainConfig built from them supplies the defaults.
SHARED_FIELDS = ("density", "num_params", "scorer", "scorer_weights", "allocation", "target_modules",
                 "calibration_batches", "batch_size", "max_length", "seed", "dtype")


def make_train_config(args):
    """A TrainConfig of these flags (the rest its defaults): selection, batch size, max length and seed
    exactly as `sparseft train` would use them."""
    from ..training.config import TrainConfig

    return TrainConfig.from_dict({k: getattr(args, k) for k in SHARED_FIELDS if getattr(args, k) is not None})


def run(args) -> int:
    from ..atomic import check_out_file
    from ..errors import ConfigError
    from ..files import existing_data
    from ..loading import load_model, load_tokenizer, pad_token_id
    from ..selection import budget_report, format_budget_report, get_scorer, save_masks, select
    from ..targets import find_targets
    from ..training.data import calibration_batches, load_examples

    check_out_file(args.out, inputs=[args.data, args.model])  # masks written over the data would lose it
    run_cfg = make_train_config(args)
    cfg = run_cfg.sparse_config()
    batches = None
    if get_scorer(cfg.scorer).needs_data_for(cfg.scorer_weights):
        if not args.data:
            raise ConfigError(f"scorer {cfg.scorer!r} needs calibration data; pass --data FILE")
        existing_data(args.data)  # before the tokenizer and the model load, not after
        tokenizer = load_tokenizer(args.model)
        examples = load_examples(args.data, tokenizer, run_cfg.max_length, truncation=True)
        # The same first batches `sparseft train` calibrates on with the same seed and batch size.
        batches = calibration_batches(examples, run_cfg.batch_size, pad_token_id(tokenizer), cfg.seed,
                                      cfg.calibration_batches)
    model = load_model(args.model, dtype=run_cfg.dtype)
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
