"""sparseft apply: merge a diff into its base and write a plain Hugging Face model directory."""

from __future__ import annotations

from .options import add_model_options, add_unverified_base_option


def add_parser(sub):
    p = sub.add_parser(
        "apply",
        help="merge a diff into its base model and save the result as a normal HF model directory",
        description="Load BASE, check the diff was made for it (fingerprint), write W + S into the targeted "
        "weights and save a model directory any transformers code can load. The base files are not modified.",
    )
    add_model_options(p)
    p.add_argument("--diff", required=True, metavar="DIR", help="diff directory")
    p.add_argument("--out", required=True, metavar="MERGED_DIR", help="where to write the merged model")
    add_unverified_base_option(p, "apply a diff")
    return p


def run(args) -> int:
    from ..model import SparseModel
    from ..loading import load_model, load_tokenizer, save_model_dir

    base = load_model(args.model, dtype=args.dtype)
    merged = SparseModel.from_pretrained(base, args.diff, allow_unverified_base=args.allow_unverified_base).merge_and_unload()
    save_model_dir(merged, load_tokenizer(args.model, required=False), args.out)
    print(f"merged {args.diff} into {args.model} -> {args.out}")
    return 0
