"""What a quantized base costs at a diff's own entries: score diffs trained over it as they are, and
again with each entry's quantization error W − dequantized(Q(W)) added, on held-out data.

    python -m sparseft.bench.quant_correction --model smollm2-135m --quantize nf4 \\
        --task sst2-val --data ../shared/data/sst2/train.tsv --limit 1000 \\
        runs/sst2-quant/runs/sparse-nf4/artifact runs/sst2-quant/runs/sparse-nf4-s1/artifact

Adding the error puts the diff's k entries back at their full-precision weights and leaves the rest
rounded: what ``quantize_init="correction"`` starts training from, applied here after the fact to diffs
trained from zero (the first evidence looked at for ``quantize_init``, docs/training.md).

With ``--trained-from-error DIFF ...`` (one per positional diff, the same seeds in the same order) the
second column is those diffs as trained instead, i.e. trained *from* the error (``quantize_init:
correction``) against trained from zero, on the same held-out examples::

    python -m sparseft.bench.quant_correction --model smollm2-135m --quantize nf4 --task sst2-val \
        --data ../shared/data/sst2/train.tsv --limit 1000 $R/sparse-nf4/artifact ... \
        --trained-from-error $R/sparse-nf4-corr/artifact ...

``--versus DIFF ...`` does the same for any other diffs over that base trained from zero (e.g. with the
entries chosen over the quantized base, ``select_over: quantized``): the second column is those as trained.

Each variant is merged into a dense copy of the dequantized base in ``--dtype`` (the same function as the
diff unmerged over the codes, up to float rounding, and much faster to score on CPU). Prints one Markdown
row per diff with the paired bootstrap interval of the difference over the scored examples.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from ..base_match import recorded_train_config, trained_over
from ..diffio import read_diff
from ..errors import ConfigError
from ..evaluate import evaluate_records_detailed
from ..loading import load_model, load_tokenizer
from ..quantize import QUANT_SCHEMES, dequantized, linear_layers, quantize_base
from ..tasks import get_task
from .config import QUANT_INIT_BEFORE_OPTION
from .stats import paired_bootstrap, seed_averaged


def rounded_weights(model: torch.nn.Module, scheme: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(full precision, dequantized)`` fp32 copies of every linear weight ``quantize_base`` would quantize."""
    originals = {name: m.weight.detach().float().clone() for name, m in linear_layers(model).items()}
    quantized = quantize_base(copy.deepcopy(model), scheme)  # it works in place
    rounded = {name: dequantized(m.weight).float() for name, m in quantized.named_modules() if name in originals}
    return originals, rounded


def set_weights(model, rounded, originals, diff, add_error: bool) -> None:
    """Each linear weight := dequantized base + the diff's values (+ the error at its entries)."""
    layers = linear_layers(model)
    with torch.no_grad():
        for name, module in layers.items():
            weight = rounded[name].clone()
            if name in diff.masks:
                flat, indices = weight.view(-1), diff.masks[name].long()
                flat[indices] += diff.values[name].float()
                if add_error:
                    flat[indices] += originals[name].view(-1)[indices] - rounded[name].view(-1)[indices]
            module.weight.copy_(weight.to(module.weight.dtype))


def check_trained_over(path: str, scheme: str, dtype: str, init: str) -> None:
    """The diff was trained over ``scheme`` in ``dtype`` with its values starting as ``init`` says."""
    provenance = read_diff(path).provenance
    trained_dtype, trained_scheme = trained_over(provenance)
    if trained_scheme != scheme or (trained_dtype or "float32") != dtype:
        raise ConfigError(f"{path}: trained over {trained_scheme or 'no quantized'} base in {trained_dtype}, "
                          f"not {scheme} in {dtype}: pass the --quantize and --dtype it trained with")
    # Runs from before the option started at zero and record no quantize_init.
    started = recorded_train_config(provenance).get("quantize_init", QUANT_INIT_BEFORE_OPTION)
    if started != init:
        raise ConfigError(f"{path}: its values started as quantize_init={started!r}; expected {init!r} here "
                          "(positional diffs: trained from zero; --trained-from-error: from the error)")


def score(model, tokenizer, task, records, rounded, originals, diff, add_error: bool) -> tuple[float, list[float]]:
    """The task's headline metric and its per-example scores with the weights ``set_weights`` makes."""
    set_weights(model, rounded, originals, diff, add_error)
    metrics, per_example, _, _ = evaluate_records_detailed(model, tokenizer, task, records, progress=False)
    metric = task.primary_metric or next(iter(metrics))
    return metrics[metric], per_example[metric]


def row(label: str, plain: float, fixed: float, gap) -> str:
    return (f"| {label} | {100 * plain:.2f} | {100 * fixed:.2f} | "
            f"{100 * gap.mean:+.2f} [{100 * gap.low:+.2f}, {100 * gap.high:+.2f}] |")


def diff_label(path: str) -> str:
    """A bench row's diff (``ROW/artifact``) by its row id, any other by its directory's name."""
    where = Path(path)
    return where.parent.name if where.name == "artifact" else where.name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    option = "--trained-from-error" if args.trained_from_error else "--versus"
    others = args.trained_from_error or args.versus
    try:
        if args.trained_from_error and args.versus:
            raise ConfigError("give --trained-from-error or --versus, not both")
        if others and len(others) != len(args.diffs):
            raise ConfigError(f"{option} names {len(others)} diffs for {len(args.diffs)} positional ones; "
                              "give one per positional diff, the same seeds in the same order")
        for path in args.diffs + (args.versus or []):
            check_trained_over(path, args.quantize, args.dtype, "zero")
        for path in args.trained_from_error or []:
            check_trained_over(path, args.quantize, args.dtype, "correction")
        task = get_task(args.task)
        records = task.load(args.data, args.limit)
    except (ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype), load_tokenizer(args.model)
    originals, rounded = rounded_weights(model, args.quantize)
    second = ("trained from its entries' error" if args.trained_from_error else "the --versus diff as trained"
              if others else "with its entries' error added")
    print(f"{args.model} ({args.dtype}), {args.quantize} base; {args.task} on {len(records)} examples of {args.data}\n")
    print(f"| diff | as trained | {second} | difference, 95% interval |\n|---|---|---|---|")
    plain_all, fixed_all = [], []
    for i, path in enumerate(args.diffs):
        diff = read_diff(path)
        plain, plain_each = score(model, tokenizer, task, records, rounded, originals, diff, add_error=False)
        # The second column: the other diff as trained, or this one with its entries' error added.
        second_diff, add_error = (read_diff(others[i]), False) if others else (diff, True)
        fixed, fixed_each = score(model, tokenizer, task, records, rounded, originals, second_diff, add_error)
        plain_all.append(plain_each)
        fixed_all.append(fixed_each)
        label = f"{diff_label(path)} / {diff_label(others[i])}" if others else diff_label(path)
        print(row(label, plain, fixed, paired_bootstrap(fixed_each, plain_each)), flush=True)
    if len(args.diffs) > 1:  # each example's scores averaged over the diffs (seeds), as the protocol pairs them
        plain_mean, fixed_mean = seed_averaged(plain_all), seed_averaged(fixed_all)
        print(row(f"mean of {len(args.diffs)}", sum(plain_mean) / len(plain_mean), sum(fixed_mean) / len(fixed_mean),
                  paired_bootstrap(fixed_mean, plain_mean)))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sparseft.bench.quant_correction", description=__doc__.split("\n\n")[0])
    p.add_argument("diffs", nargs="+", help="diff directories trained over the --quantize base, values from zero")
    p.add_argument("--trained-from-error", nargs="+", metavar="DIFF",
                   help="diffs trained from their entries' error (quantize_init: correction), one per positional "
                        "diff in the same seed order: compared as trained instead of adding the error")
    p.add_argument("--versus", nargs="+", metavar="DIFF",
                   help="other diffs over the same base trained from zero (e.g. select_over: quantized), one per "
                        "positional diff in the same seed order: compared as trained")
    p.add_argument("--model", required=True, help="the base the diffs were trained over (alias or directory)")
    p.add_argument("--quantize", required=True, choices=list(QUANT_SCHEMES))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the run's --dtype")
    p.add_argument("--task", required=True, help="a task name, e.g. sst2-val (held-out rows of train.tsv)")
    p.add_argument("--data", required=True, help="the task's data file")
    p.add_argument("--limit", type=int, help="score the first N examples")
    p.add_argument("--threads", type=int, help="torch threads")
    return p.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
