"""sparseft serve: an OpenAI-compatible server over one base model and many sparse diffs."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from .options import add_model_options, add_quantize_option, add_unverified_base_option, positive_int


def diff_spec(text: str) -> tuple[str, str]:
    name, eq, path = text.partition("=")
    if not eq or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, path


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port from 1 to 65535, got {text!r}")
    return port


def add_parser(sub):
    p = sub.add_parser(
        "serve",
        help="serve a base model and many sparse diffs over an OpenAI-compatible HTTP API",
        description="Serve BASE and any number of diffs over it. A request's `model` picks the base (its served "
        "name), a diff (NAME: its current version) or NAME@VERSION. Diffs can be loaded, unloaded and rolled back "
        "at run time under /admin/diffs; with --registry that state survives restarts. See docs/serving.md.",
    )
    add_model_options(p)
    add_quantize_option(p, "serve over", "diffs trained with the same --quantize and --dtype, run unmerged: "
                        "--strategy auto or mixed")
    p.add_argument("--quantize-skip", metavar="PATTERNS",
                   help="with --quantize, comma-separated fnmatch patterns of linear layers left unquantized (a mixed "
                   "base, as `train --quantize-skip` makes; default: those the --diff diffs' training runs left so)")
    p.add_argument("--diff", action="append", default=[], type=diff_spec, metavar="NAME=DIR",
                   help="load the diff in DIR (or Hub id org/name[@rev]) under NAME at start-up (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port to listen on (default: 8000)")
    p.add_argument("--registry", metavar="DIR", help="keep loaded diffs and versions in DIR across restarts")
    p.add_argument("--served-name", help="the base's name in requests (default: the --model argument)")
    p.add_argument("--device", default="cpu",
                   help="torch device for the model: auto (CUDA when present), cpu, cuda or cuda:N (default: cpu)")
    # Every count below must be >= 1 (positive_int): 0 or less would fail every request, or mean nothing.
    p.add_argument("--threads", type=positive_int,
                   help="torch intra-op threads (default: torch's choice; 1 helps on busy CPUs)")
    p.add_argument("--max-body-bytes", type=positive_int, default=1 << 20,
                   help="larger request bodies get 413 (default: 1 MiB)")
    p.add_argument("--max-tokens", type=positive_int, default=512,
                   help="largest max_tokens a request may ask for (default: 512)")
    p.add_argument("--max-prompt-tokens", type=positive_int,
                   help="longest prompt accepted (default, or when over it: the model's context)")
    p.add_argument("--max-queue", type=positive_int, default=256,
                   help="queued requests beyond this get 503 (default: 256)")
    p.add_argument("--strategy", choices=["auto", "merged", "mixed"], default="auto",
                   help="merged: one request at a time, the diff merged on switch; mixed: continuous batching, each "
                   "row adds its own diff unmerged; auto (default): continuous batching that merges the diff while "
                   "every running request uses the same one, unmerged otherwise (always, over a --quantize base)")
    p.add_argument("--max-batch-size", type=positive_int, default=16,
                   help="most requests decoded together by mixed/auto (default: 16)")
    p.add_argument("--max-batch-tokens", type=positive_int,
                   help="mixed/auto admit a request only while the running ones' prompt + max_tokens sum stays "
                   "within this (default: no limit)")
    p.add_argument("--admin-token", help="require 'Authorization: Bearer TOKEN' on /admin routes")
    ray = p.add_argument_group("scale-out on Ray Serve (pip install 'sparseft[ray]'; see docs/serving.md)")
    ray.add_argument("--ray", action="store_true",
                     help="serve with Ray Serve: --replicas copies of the base, each loading diffs on demand from "
                     "--diff-dir, --registry (read only) or --diff; joins the cluster at RAY_ADDRESS if set")
    # These default to None so that giving one without --ray is an error; RayOptions holds the real defaults.
    ray.add_argument("--replicas", type=positive_int, help="replicas, each holding the base (default: 2)")
    ray.add_argument("--max-diffs-per-replica", type=positive_int,
                     help="diffs one replica keeps loaded; the least recently used is unloaded beyond it (default: 4)")
    ray.add_argument("--diff-dir", metavar="DIR", help="a directory of diffs: a request for NAME loads DIR/NAME")
    ray.add_argument("--replica-cpus", type=float, help="CPUs Ray reserves per replica (default: 1)")
    add_unverified_base_option(p, "serve a diff")
    return p


RAY_ONLY = {"diff_dir": "--diff-dir", "replicas": "--replicas", "max_diffs_per_replica": "--max-diffs-per-replica",
            "replica_cpus": "--replica-cpus"}


def run(args) -> int:
    import uvicorn

    from dataclasses import replace

    from ..atomic import check_dir_to_write_into
    from ..diffio import check_diff_dir, recorded_skip
    from ..hub import resolve_diff
    from ..serve import ServeLimits, build_app
    from ..loading import check_device
    from ..serve.registry import stored_paths

    check_device(args.device, "--device")  # before any diff is fetched or model loaded
    if args.registry is not None:  # a file there failed at the first diff loaded, after the model had loaded;
        check_dir_to_write_into(args.registry, "--registry")  # "" put the registry in the working directory
    engine = engine_options(args)
    args.diff = [(name, str(resolve_diff(path))) for name, path in args.diff]  # Hub ids to their local snapshot
    for _, path in args.diff:  # a missing one was named only after the base had loaded
        check_diff_dir(path)
    if not engine.quantize_skip:  # Ray's replicas load no --diff before their base: they take the skip from here
        served = [path for _, path in args.diff] + stored_paths(args.registry)
        engine = replace(engine, quantize_skip=tuple(recorded_skip(served, args.quantize)))
    limits = ServeLimits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens,
                         max_prompt_tokens=args.max_prompt_tokens, max_queue=args.max_queue)
    if args.ray:
        return run_on_ray(args, limits, engine)
    check_no_ray_flags(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    app = build_app(args.model, args.diff, registry_dir=args.registry, served_name=args.served_name,
                    dtype=args.dtype, device=args.device, limits=limits, admin_token=args.admin_token,
                    **engine.as_kwargs())
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def engine_options(args):
    """The engine flags, checked before any model is loaded (e.g. ``--strategy merged --quantize nf4``)."""
    from ..serve.server import EngineOptions

    return EngineOptions(strategy=args.strategy, max_batch_size=args.max_batch_size,
                         max_batch_tokens=args.max_batch_tokens, allow_unverified_base=args.allow_unverified_base,
                         quantize=args.quantize, quantize_skip=args.quantize_skip or ())


def check_no_ray_flags(args) -> None:
    given = [flag for dest, flag in RAY_ONLY.items() if getattr(args, dest) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} only apply with --ray")


def run_on_ray(args, limits, engine) -> int:
    """``sparseft serve --ray``: the same app on Ray Serve, until Ctrl-C."""
    try:
        from ..serve.ray_app import DiffSource, RayOptions, build_ray_app, run_ray

        import ray.serve  # noqa: F401  (only to fail early, with the fix, when the extra is missing)
    except ImportError as e:
        raise ConfigError(f"--ray needs Ray Serve: pip install 'sparseft[ray]' ({e})") from e
    given = {dest: getattr(args, dest) for dest in RAY_ONLY if dest != "diff_dir" and getattr(args, dest) is not None}
    options = RayOptions(**given, threads=args.threads)
    source = DiffSource(named=dict(args.diff), root=args.diff_dir, registry_dir=args.registry)
    app = build_ray_app(args.model, source, served_name=args.served_name, dtype=args.dtype, device=args.device,
                        limits=limits, admin_token=args.admin_token, options=options, engine=engine)
    run_ray(app, args.host, args.port)
    return 0
