"""sparseft export: write a diff in another library's format (today: a PEFT SHiRA adapter)."""

from __future__ import annotations

import json


def add_parser(sub):
    p = sub.add_parser(
        "export",
        help="write a diff as a PEFT SHiRA adapter that PeftModel.from_pretrained loads as it is",
        description="Write DIFF as a PEFT SHiRA adapter directory (adapter_config.json + adapter_model.safetensors), "
        "so code that only knows PEFT can use it: PeftModel.from_pretrained(base, OUT). SHiRA stores exactly "
        "r*(in+out) entries in every layer with one global r: export takes the smallest r that holds the densest "
        "layer and pads the other layers with zero values at unused positions. The report gives r, the padding "
        "and the adapter's size next to the diff's (float32 values and int32 row/col pairs: about 3x the bytes "
        "per entry of a bf16 diff, before padding). Bring it back with `sparseft import`.",
        epilog="example: sparseft export --to peft runs/routing runs/routing-shira",
    )
    p.add_argument("--to", required=True, choices=["peft"], help="target format: peft (a SHiRA adapter)")
    p.add_argument("diff", metavar="DIFF", help="diff directory")
    p.add_argument("out", metavar="OUT", help="adapter directory to write")
    p.add_argument(
        "--base-model", metavar="NAME",
        help="base_model_name_or_path to record in adapter_config.json (default: the base the diff records)",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return p


def run(args) -> int:
    from ..atomic import check_out_dir
    from ..diffio import read_diff
    from ..peft_interop import export_shira, format_export_report

    check_out_dir(args.out, "OUT", inputs=[args.diff])  # an adapter written over the diff would lose it
    report = export_shira(read_diff(args.diff), args.out, base_model=args.base_model, diff_dir=args.diff)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_export_report(report, args.out))
    return 0
