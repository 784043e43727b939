"""sparseft apply: merge a diff into its base and write a plain Hugging Face model directory."""

from __future__ import annotations

import json

from ..atomic import MERGE_RECORD
from .options import add_model_options, add_quantize_option, add_unverified_base_option


def add_parser(sub):
    p = sub.add_parser(
        "apply",
        help="merge a diff into its base model and save the result as a normal HF model directory",
        description="Load BASE, check the diff was made for it (fingerprint), write W + S into the targeted "
        "weights and save a model directory any transformers code can load. The base files are not modified. "
        "With --quantize: load the base quantized as the diff's training run did, check the diff against that "
        "base, then dequantize its linear weights and merge into those (a dense model, for export).",
    )
    add_model_options(p)
    add_quantize_option(p, "merge a diff trained over", "with the same --dtype; the output holds the dequantized "
                        "weights + the diff, in --dtype")
    p.add_argument("--diff", required=True, metavar="DIR", help="diff directory")
    p.add_argument("--out", required=True, metavar="MERGED_DIR", help="where to write the merged model")
    add_unverified_base_option(p, "apply a diff")
    return p


def run(args) -> int:
    from ..atomic import check_out_dir
    from ..diffio import recorded_skip
    from ..loading import load_tokenizer, save_model_dir
    from ..methods.registry import load_base
    from ..model import SparseModel

    check_out_dir(args.out, inputs=[args.diff, args.model])  # replacing either would lose it
    # Quantized as in training, so the diff's fingerprint (taken over the codes) is checked before any merge.
    base = load_base(args.model, args.dtype, args.quantize, recorded_skip([args.diff], args.quantize))
    sparse = SparseModel.from_pretrained(base, args.diff, allow_unverified_base=args.allow_unverified_base)
    if args.quantize:
        from ..quantize import dequantize_base

        dequantize_base(sparse.base_model)  # codes cannot take the entries; their dense weights can
    merged = sparse.merge_and_unload()
    # What the merged model was made from; it also marks the directory as one apply may replace next time.
    made_from = {"base_model": str(args.model), "diff": str(args.diff), "dtype": args.dtype, "quantize": args.quantize}
    save_model_dir(merged, load_tokenizer(args.model, required=False), args.out,
                   extra={MERGE_RECORD: json.dumps(made_from, indent=2) + "\n"})
    over = f" (its {args.quantize} base dequantized to {args.dtype})" if args.quantize else ""
    print(f"merged {args.diff} into {args.model}{over} -> {args.out}")
    return 0
