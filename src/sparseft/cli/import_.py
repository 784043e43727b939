"""sparseft import: turn a PEFT sparse adapter (SHiRA, Super-Tuning) into a sparseft diff of its base."""

from __future__ import annotations

from ..config import VALUE_DTYPES
from .options import add_model_options


def add_parser(sub):
    p = sub.add_parser(
        "import",
        help="turn a PEFT SHiRA (or Super-Tuning) adapter into a sparseft diff with its base's fingerprint",
        description="Read a PEFT adapter directory whose peft_type is SHIRA (or SUPERTUNING without its LoRA "
        "part), load BASE to check every adapted module is a linear layer of it and record its fingerprint, and "
        "write a sparseft diff: afterwards apply, eval, serve, verify and compose take it like a trained one. "
        "Zero values are dropped (they change nothing, and are what `sparseft export` pads SHiRA layers with).",
        epilog="example: sparseft import runs/routing-shira runs/routing-again --model smollm2-135m",
    )
    p.add_argument("adapter", metavar="ADAPTER", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", metavar="OUT", help="diff directory to write")
    add_model_options(p, what="the adapter's base model", why="its fingerprint is taken in --dtype")
    p.add_argument(
        "--value-dtype", choices=VALUE_DTYPES,
        help="dtype of the diff's values (default: the one `sparseft export` recorded, else float32, which is exact)",
    )
    p.add_argument("--keep-zeros", action="store_true", help="keep zero-valued entries (the padding) as entries of the diff")
    return p


def run(args) -> int:
    from ..atomic import check_out_dir
    from ..diffio import write_diff
    from ..loading import load_model
    from ..peft_interop import import_adapter

    check_out_dir(args.out, "OUT", inputs=[args.adapter, args.model])  # a diff written over either would lose it
    model = load_model(args.model, dtype=args.dtype)
    diff = import_adapter(args.adapter, model, base_model=str(args.model), value_dtype=args.value_dtype, keep_zeros=args.keep_zeros)
    write_diff(diff, args.out)
    kind = diff.provenance["imported_from"]["peft_type"]
    print(f"imported {kind} adapter {args.adapter}: {diff.num_entries:,} entries in {len(diff.masks)} modules "
          f"({diff.config.value_dtype} values) -> {args.out}")
    return 0
