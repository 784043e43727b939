"""sparseft eval: score a base model, base + sparse diff, or base + LoRA adapter on a task."""

from __future__ import annotations

import json

from .options import add_model_options, add_quantize_option, add_unverified_base_option, positive_int


def add_parser(sub):
    from ..tasks import TASKS

    p = sub.add_parser(
        "eval",
        help="evaluate a model (optionally with a sparse diff or LoRA adapter) on a task",
        description="Run TASK over the examples in DATA and report its metrics (classification: accuracy from "
        "label likelihoods; QA: exact match and F1; summarization: ROUGE-1/2/L). Metrics are fractions in "
        "[0, 1] in --json output and percentages in the table.",
    )
    add_model_options(p)
    add_quantize_option(p, "evaluate over", "a sparse diff trained with the same --quantize and --dtype, applied "
                        "unmerged; or the base alone")
    p.add_argument(
        "--diff", metavar="DIR",
        help="a sparse diff or a PEFT adapter directory (LoRA, SHiRA, ...; default: the base)",
    )
    p.add_argument(
        "--task", required=True, metavar="TASK",
        help=f"a task name ({', '.join(sorted(TASKS))}), a task file path/to/task.yaml (see docs/tasks.md), "
        "or 'classification' with the flags below for a JSON Lines classification file",
    )
    inline = p.add_argument_group("--task classification (no task file needed)")
    inline.add_argument("--labels", metavar="A,B,C", help="label words, comma-separated (default: the distinct labels of the data, sorted)")
    inline.add_argument("--text-field", metavar="NAME", default="text", help="field of each row holding the text (default: text)")
    inline.add_argument("--label-field", metavar="NAME", default="label", help="field of each row holding the label word (default: label)")
    p.add_argument("--data", required=True, metavar="PATH", help="data file in the task's format, or a Hugging Face dataset hf:NAME[:CONFIG]:SPLIT")
    p.add_argument("--limit", type=positive_int, metavar="N", help="only the first N examples")
    p.add_argument("--batch-size", type=positive_int, default=8, help="examples per forward pass (default: 8)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present, else the CPU), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_unverified_base_option(p, "evaluate a sparse diff")
    return p


def resolve_task(args):
    """The task object for ``--task classification`` with its flags, else the name or file as given."""
    from ..errors import ConfigError
    from ..tasks import classification_from_flags

    if args.task == "classification":
        return classification_from_flags(args.labels, args.text_field, args.label_field)
    if args.labels or args.text_field != "text" or args.label_field != "label":
        raise ConfigError("--labels, --text-field and --label-field go with --task classification")
    return args.task


def run(args) -> int:
    from ..evaluate import format_result, run_eval
    from ..files import existing_data
    from ..loading import check_device

    check_device(args.device, "--device")  # named as the flag, before the data or the model loads
    task = resolve_task(args)  # flags that do not go together, before any file is looked at
    existing_data(args.data)  # named as the flag too: the task's reader took "" for "." (". : no such data file")
    result = run_eval(
        args.model,
        task,
        args.data,
        diff=args.diff,
        limit=args.limit,
        batch_size=args.batch_size,
        dtype=args.dtype,
        quantize=args.quantize,
        device=args.device,
        progress=True,  # tqdm writes to stderr: --json output on stdout stays clean
        allow_unverified_base=args.allow_unverified_base,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_result(result))
    return 0
