"""sparseft serve: an OpenAI-compatible server over one base model and many sparse diffs."""

from __future__ import annotations

import argparse

from ..config import DTYPES


def diff_spec(text: str) -> tuple[str, str]:
    name, eq, path = text.partition("=")
    if not eq or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, path


def add_parser(sub):
    p = sub.add_parser(
        "serve",
        help="serve a base model and many sparse diffs over an OpenAI-compatible HTTP API",
        description="Serve BASE and any number of diffs over it. A request's `model` picks the base (its served "
        "name), a diff (NAME: its current version) or NAME@VERSION. Diffs can be loaded, unloaded and rolled back "
        "at run time under /admin/diffs; with --registry that state survives restarts. See docs/serving.md.",
    )
    p.add_argument("--model", required=True, help="base model: alias (e.g. smollm2-135m), local directory or HF id")
    p.add_argument("--diff", action="append", default=[], type=diff_spec, metavar="NAME=DIR",
                   help="load the diff in DIR under NAME at start-up (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--registry", metavar="DIR", help="keep loaded diffs and versions in DIR across restarts")
    p.add_argument("--served-name", help="the base's name in requests (default: the --model argument)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype to load the base in (default: float32)")
    p.add_argument("--device", default="cpu", help="torch device for the model (default: cpu)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice; 1 helps on busy CPUs)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413 (default: 1 MiB)")
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for (default: 512)")
    p.add_argument("--max-prompt-tokens", type=int, help="longest prompt accepted (default: the model's context)")
    p.add_argument("--max-queue", type=int, default=256, help="queued requests beyond this get 503 (default: 256)")
    p.add_argument("--admin-token", help="require 'Authorization: Bearer TOKEN' on /admin routes")
    p.add_argument("--allow-unverified-base", action="store_true",
                   help="also serve diffs that record no base fingerprint (logged as a warning; default: refuse them)")
    return p


def run(args) -> int:
    import uvicorn

    from ..serve import ServeLimits, build_app

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    limits = ServeLimits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens,
                         max_prompt_tokens=args.max_prompt_tokens, max_queue=args.max_queue)
    app = build_app(args.model, args.diff, registry_dir=args.registry, served_name=args.served_name,
                    dtype=args.dtype, device=args.device, limits=limits, admin_token=args.admin_token,
                    allow_unverified_base=args.allow_unverified_base)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
