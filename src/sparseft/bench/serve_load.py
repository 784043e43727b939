"""A bounded, loopback-only load test of ``sparseft serve`` (the numbers in docs/benchmarks/serving.md).

It builds a random-init Llama of a chosen size with a word-level tokenizer, N random sparse diffs
over it, starts ``sparseft serve`` as a subprocess on 127.0.0.1 with those diffs, and sends a fixed
number of greedy completions, each for a diff drawn at random, from a fixed number of concurrent
clients. It reports requests/s, generated tokens/s, client-side p50/p99 latency and the swaps the
server made; separately it times one swap (restore one diff, merge another) in-process.

Everything is bounded: at most 2000 requests and 600 s per scenario, 64 clients, 128 tokens each.

    python -m sparseft.bench.serve_load --size small --diffs 0 1 8 64 --requests 200 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .shapes import SHAPES, build_llama, numbered_vocab, word_level_tokenizer

MAX_REQUESTS, MAX_SECONDS, MAX_CONCURRENCY, MAX_TOKENS = 2000, 600, 64, 128


def random_llama(size: str):
    """The served base (seed 0), with room for any prompt plus ``MAX_TOKENS`` generated tokens."""
    return build_llama(size, seed=0, min_positions=1024)


def build_fixture(root: Path, size: str, num_diffs: int, density: float) -> tuple[Path, list[Path]]:
    """A model directory and ``num_diffs`` random diffs over it (all projections, ``density`` each).

    Its tokenizer names every id (``w<id>``): any sequence the model generates decodes, nothing is downloaded.
    """
    from .. import SparseConfig, get_sparse_model

    model = random_llama(size)
    model.save_pretrained(root / "base")
    vocab = numbered_vocab(["<unk>", "<s>", "</s>"], model.config.vocab_size)
    word_level_tokenizer(vocab, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(root / "base")
    diffs = []
    for i in range(num_diffs):
        sparse = get_sparse_model(random_llama(size), SparseConfig(density=density, scorer="random", seed=i))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for values in sparse.sparse_parameters():
                values.copy_(torch.randn(values.shape, generator=gen) * 0.02)
        diffs.append(sparse.save_pretrained(root / f"diff{i}"))
    return root / "base", diffs


# ---------------------------------------------------------------- swap latency (in-process)


def time_swaps(size: str, density: float, repeats: int) -> dict[str, float]:
    """Median/p99 ms of switching between two diffs (restore + merge) and of merging onto the base."""
    from .. import SparseConfig, get_sparse_model
    from ..serve.engine import Engine
    from ..serve.registry import DiffRegistry

    engine = Engine(random_llama(size), tokenizer=None)
    registry = DiffRegistry(engine.validated_entries)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(2):
            sparse = get_sparse_model(random_llama(size), SparseConfig(density=density, scorer="random", seed=i))
            registry.load(f"d{i}", sparse.save_pretrained(Path(tmp) / f"d{i}"))
    a, b = registry.resolve("d0"), registry.resolve("d1")
    switch, merge = [], []
    with engine.weights_lock:
        for _ in range(repeats):
            engine.switch_to(None)
            start = time.perf_counter()
            engine.switch_to(a)
            merge.append(time.perf_counter() - start)
            start = time.perf_counter()
            engine.switch_to(b)
            switch.append(time.perf_counter() - start)
        engine.switch_to(None)
    return {
        "entries": a.num_entries,
        "merge_p50_ms": 1e3 * statistics.median(merge),
        "switch_p50_ms": 1e3 * statistics.median(switch),
        "switch_p99_ms": 1e3 * percentile(switch, 99),
    }


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


# ---------------------------------------------------------------- the load


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, diffs: list[Path], port: int, threads: int,
                 strategy: str = "auto") -> subprocess.Popen:
    src = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "sparseft", "serve", "--model", str(model_dir), "--served-name", "base",
           "--host", "127.0.0.1", "--port", str(port), "--max-tokens", str(MAX_TOKENS), "--max-queue", "1024",
           "--threads", str(threads), "--strategy", strategy]
    for i, d in enumerate(diffs):
        cmd += ["--diff", f"d{i}={d}"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def wait_healthy(client, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        await asyncio.sleep(0.25)
    raise RuntimeError("the server did not become healthy in time")


def swaps_so_far(metrics_text: str) -> tuple[float, float]:
    count = re.search(r"^sparseft_swaps_total (\S+)$", metrics_text, re.M)
    seconds = re.search(r"^sparseft_swap_seconds_sum (\S+)$", metrics_text, re.M)
    return float(count.group(1)) if count else 0.0, float(seconds.group(1)) if seconds else 0.0


async def drive(url: str, models: list[str], vocab: int, requests: int, concurrency: int, max_tokens: int,
                time_limit: float, seed: int) -> dict[str, float]:
    import httpx

    rng = random.Random(seed)
    plan = [(rng.choice(models), [rng.randrange(3, vocab) for _ in range(16)]) for _ in range(requests)]
    latencies: list[float] = []
    tokens = 0
    errors = 0
    async with httpx.AsyncClient(base_url=url, timeout=time_limit) as client:
        await client.post("/v1/completions", json={"model": models[0], "prompt": plan[0][1], "max_tokens": 2})
        swaps0, swap_s0 = swaps_so_far((await client.get("/metrics")).text)
        queue: asyncio.Queue = asyncio.Queue()
        for item in plan:
            queue.put_nowait(item)
        stop_at = time.monotonic() + time_limit

        async def client_loop():
            nonlocal tokens, errors
            while not queue.empty() and time.monotonic() < stop_at:
                model, prompt = queue.get_nowait()
                start = time.perf_counter()
                r = await client.post("/v1/completions", json={
                    "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
                if r.status_code != 200:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)
                tokens += r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        load_average = os.getloadavg()[0]  # other work on the machine skews every figure; say how much
        swaps1, swap_s1 = swaps_so_far((await client.get("/metrics")).text)
    done = len(latencies)
    return {
        "requests": done, "errors": errors, "seconds": wall, "req_per_s": done / wall, "tok_per_s": tokens / wall,
        "p50_ms": 1e3 * statistics.median(latencies), "p99_ms": 1e3 * percentile(latencies, 99),
        "swaps": swaps1 - swaps0, "swap_mean_ms": 1e3 * (swap_s1 - swap_s0) / max(1.0, swaps1 - swaps0),
        "load_average": load_average,
    }


async def run_scenario(model_dir: Path, diffs: list[Path], vocab: int, args) -> dict[str, float]:
    import httpx

    port = free_loopback_port()
    proc = start_server(model_dir, diffs, port, args.threads, args.strategy)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            await wait_healthy(c, proc)
        models = [f"d{i}" for i in range(len(diffs))] or ["base"]
        return await drive(url, models, vocab, args.requests, args.concurrency, args.max_tokens, args.time_limit,
                           seed=len(diffs))
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def markdown(args, swap: dict, rows: list[tuple[int, dict]]) -> str:
    lines = [
        f"Model: random-init Llama `{args.size}` ({', '.join(f'{k}={v}' for k, v in SHAPES[args.size].items())}); "
        f"diffs at density {args.density} on all q/k/v/o/gate/up/down projections; "
        f"{args.concurrency} concurrent clients, greedy, 16-token prompts, max_tokens={args.max_tokens}, "
        f"each request for a diff drawn uniformly at random; server with {args.threads} torch thread(s).",
        "",
        "| diffs loaded | requests | req/s | gen tok/s | p50 ms | p99 ms | swaps | swaps/request | mean swap ms "
        "| time in swaps | 1-min load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in rows:
        label = f"{n}" if n else "0 (base only)"
        lines.append(
            f"| {label} | {r['requests']} | {r['req_per_s']:.1f} | {r['tok_per_s']:.0f} | {r['p50_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {r['swaps']:.0f} | {r['swaps'] / max(1, r['requests']):.2f} | {r['swap_mean_ms']:.2f} "
            f"| {100 * r['swaps'] * r['swap_mean_ms'] / 1e3 / r['seconds']:.1f}% | {r.get('load_average', float('nan')):.1f} |"
        )
    lines += [
        "",
        f"Swap latency in-process, `{args.swap_size}` shape, {swap['entries']:,} entries per diff "
        f"(density {args.density}), {args.swap_repeats} repeats: merge onto the base p50 {swap['merge_p50_ms']:.2f} ms; "
        f"switch diff→diff (exact restore + merge) p50 {swap['switch_p50_ms']:.2f} ms, p99 {swap['switch_p99_ms']:.2f} ms.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparseft.bench.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SHAPES), default="small")
    p.add_argument("--swap-size", choices=sorted(SHAPES), default=None, help="model shape for the swap timing")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--diffs", type=int, nargs="+", default=[0, 1, 8, 64], help="scenarios: diffs loaded (0: base only)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--time-limit", type=float, default=120, help="seconds per scenario")
    p.add_argument("--swap-repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server and the swap timing")
    p.add_argument("--strategy", choices=["auto", "merged", "mixed"], default="auto",
                   help="the server's --strategy (the published table is `merged`, measured before the others existed)")
    p.add_argument("--out", type=Path, help="also write the Markdown table here")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    args = p.parse_args(argv)
    args.swap_size = args.swap_size or args.size
    if not (1 <= args.requests <= MAX_REQUESTS and 1 <= args.concurrency <= MAX_CONCURRENCY
            and 1 <= args.max_tokens <= MAX_TOKENS and 0 < args.time_limit <= MAX_SECONDS and max(args.diffs) <= 64):
        p.error(f"bounds: requests <= {MAX_REQUESTS}, concurrency <= {MAX_CONCURRENCY}, max_tokens <= {MAX_TOKENS}, "
                f"time-limit <= {MAX_SECONDS} s, diffs <= 64")
    torch.set_num_threads(args.threads)
    swap = time_swaps(args.swap_size, args.density, args.swap_repeats)
    print(f"swap timing: {swap}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, diffs = build_fixture(Path(tmp), args.size, max(args.diffs), args.density)
        vocab = SHAPES[args.size]["vocab_size"]
        for n in args.diffs:
            result = asyncio.run(run_scenario(model_dir, diffs[:n], vocab, args))
            print(f"{n} diffs: {result}", flush=True)
            rows.append((n, result))
    table = markdown(args, swap, rows)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}\n\n{table}")
    if args.out:
        args.out.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "swap": swap,
                                         "scenarios": [{"diffs": n, **r} for n, r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
