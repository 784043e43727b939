"""sparseft train: fine-tune sparsely (or fully / with LoRA, for comparison) on a data file."""

from __future__ import annotations

import json
import os

from ..config import DTYPES
from ..quantize import QUANT_INITS, SELECT_OVER
from .options import TrainConfigDefaults, add_model_options, add_quantize_option


def add_parser(sub):
    from ..methods import get_method, training_methods

    p = sub.add_parser(
        "train",
        help="fine-tune a model on a JSONL/CSV/datasets file; saves a sparse diff (or full model / LoRA adapter)",
        description="Select the entries to train (or load --masks), train them with AdamW (warm-up + cosine, "
        "clipping, accumulation) and save into --out: the diff (sparse), an HF model directory (full) or a peft "
        "adapter (lora), plus metrics.jsonl and the effective train_config.yaml. Every flag can come from "
        "--config run.yaml; flags given on the command line win. Runs data-parallel under torchrun / "
        "accelerate launch.",
        formatter_class=TrainConfigDefaults,
        argument_default=None,
    )
    p.add_argument("--config", metavar="YAML", help="TrainConfig fields as YAML (flags override them)")
    add_model_options(p, required=False, dtype_default=None)
    p.add_argument("--data", metavar="FILE", help="rows {prompt, completion} or {messages}: .jsonl, .csv, .parquet, .arrow, a datasets dir or hf:NAME[:CONFIG]:SPLIT")
    p.add_argument("--out", metavar="DIR", help="output directory")
    methods = training_methods()
    p.add_argument("--method", choices=methods, help="what to train: " + "; ".join(
        f"{name}: {get_method(name).help}" for name in methods))
    sel = p.add_argument_group("selection (sparse)")
    sel.add_argument("--density", type=float, help="share of targeted entries to train")
    sel.add_argument("--num-params", type=int, help="exact number of entries to train (instead of --density)")
    sel.add_argument("--scorer", help="combined (gradient + Fisher, calibrated on the first training batches; the best measured "
                     "recipe, ~3 points over random on SST-2: docs/benchmarks/sst2_smollm2_cpu_sweep.md), random, "
                     "magnitude, gradient, fisher or taylor")
    sel.add_argument("--allocation", choices=["global", "proportional", "per_module"], help="how the budget is split over modules")
    sel.add_argument("--masks", metavar="DIFF_OR_FILE", help="train exactly the entries of this diff dir or mask file (its selection settings are recorded)")
    sel.add_argument("--target-modules", help="comma-separated module names")
    sel.add_argument("--calibration-batches", type=int, help="batches a data scorer looks at")
    sel.add_argument("--scorer-weights", metavar="NAME=W,...",
                     help="weights of the parts of the combined scorer, e.g. gradient=0.5,fisher=0.5")
    sel.add_argument("--value-dtype", choices=list(DTYPES), help="dtype of saved values")
    dyn = p.add_argument_group(
        "dynamic re-selection (sparse)",
        "Let the mask move during training (RigL-style, Evci et al. 2020): every N steps each module drops the "
        "entries with the smallest |value| and grows, in their place, the entries outside its mask with the largest "
        "|gradient| on that step's first micro-batch (or summed over --reselect-growth-batches of them). k per module "
        "stays fixed; kept entries keep their values and AdamW state, grown ones start at 0. Dropping nonzero values "
        "changes the model's output by those values.")
    dyn.add_argument("--reselect-every", type=int, metavar="N",
                     help="re-select every N optimizer steps (0 or not given: off); e.g. 50 for a 500-step run")
    dyn.add_argument("--reselect-fraction", type=float, metavar="F",
                     help="share of each module's k swapped at the first re-selection, in (0, 1]; decays "
                     "with a cosine to 0 at the last step")
    dyn.add_argument("--reselect-growth-batches", type=int, metavar="N",
                     help="micro-batches whose summed gradient ranks the entries to grow (1: the step's "
                     "first); the step's own first, then the next steps'. Costs N forward+backward passes per "
                     "re-selection and, for N > 1, an fp32 buffer the size of the targeted weights meanwhile")
    opt = p.add_argument_group("optimisation")
    steps = opt.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, help="optimizer steps (not given: as many as --epochs takes)")
    steps.add_argument("--epochs", type=float, help="passes over the data, when --steps is not given")
    opt.add_argument("--lr", type=float, help="peak learning rate")
    opt.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    opt.add_argument("--warmup-steps", type=int, help="linear warm-up steps (wins over --warmup-ratio)")
    opt.add_argument("--warmup-ratio", type=float, help="warm-up as a share of all steps")
    opt.add_argument("--max-grad-norm", type=float, help="clip the gradient norm to this")
    opt.add_argument("--batch-size", type=int, help="rows per micro-batch per process")
    opt.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    opt.add_argument("--max-length", type=int, help="longest example in tokens")
    opt.add_argument("--truncation", action="store_true", help="cut longer examples instead of rejecting them")
    opt.add_argument("--seed", type=int, help="seeds selection, data order and initialisation")
    run = p.add_argument_group("run")
    run.add_argument("--save-every", type=int, help="checkpoint every N steps (0: never)")
    run.add_argument("--log-every", type=int, help="write metrics.jsonl every N steps")
    run.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                     help="continue from a checkpoint dir (no value: the newest under --out/checkpoints)")
    run.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    run.add_argument("--device", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    run.add_argument("--precision", choices=["auto", "bf16", "fp32"],
                     help="auto: bf16 autocast on CUDA, fp32 on CPU")
    add_quantize_option(run, "train over", "sparse runs")
    run.add_argument("--quantize-init", choices=list(QUANT_INITS),
                     help="with --quantize, where the trained values start: zero = 0; correction = "
                     "each selected entry's quantization error, so those entries begin at their full-precision "
                     "weights (on SST-2 no better once trained: docs/training.md); correction-after = 0, with "
                     "that error added when training ends")
    run.add_argument("--select-over", choices=list(SELECT_OVER),
                     help="with --quantize, where the entries are chosen: full = over the full-precision weights, "
                     "quantized after; quantized = over the quantized base's own gradients (the full-precision "
                     "weights are only loaded)")
    run.add_argument("--quantize-skip", metavar="PATTERNS",
                     help="with --quantize, comma-separated fnmatch patterns of linear layers to leave unquantized, "
                     "e.g. '*.down_proj' (a mixed base; other commands given the diff and --quantize rebuild it "
                     "from what the diff records)")
    run.add_argument("--fsdp", action="store_true",
                     help="under torchrun: shard the frozen base over the processes (FSDP2) instead of replicating it "
                     "(sparse runs, no re-selection)")
    lora = p.add_argument_group("LoRA baseline")
    lora.add_argument("--lora-rank", type=int, help="LoRA rank")
    lora.add_argument("--lora-alpha", type=float, help="LoRA alpha (not given: 2 × rank)")
    lora.add_argument("--lora-match-sparse", action="store_true",
                      help="choose the rank so LoRA trains about as many parameters as --density would")
    return p


def config_from_args(args):
    from ..training import TrainConfig

    fields = {k: v for k, v in vars(args).items() if k not in ("config", "verb", "handler")}
    # store_true flags are "not given" when False, so a YAML value is not overridden by their default.
    for flag in ("truncation", "lora_match_sparse", "fsdp"):
        if fields.get(flag) is False:
            fields[flag] = None
    if args.config:
        return TrainConfig.from_yaml(args.config, **fields)
    return TrainConfig.from_dict({k: v for k, v in fields.items() if v is not None})


def run(args) -> int:
    from ..training import run_training

    cfg = config_from_args(args)
    result = run_training(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {k: result.to_dict()[k] for k in ("out", "method", "steps", "trainable", "total_params", "artifact_bytes")}
        losses = result.losses
        summary.update(first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
                       tokens_per_s=round(result.tokens_per_s, 1))
        if result.selection_wall_s is not None:
            summary["selection_wall_s"] = round(result.selection_wall_s, 2)
        print(json.dumps(summary))
    return 0
