"""In-process throughput and latency of the serving strategies under a closed loop of clients
(the strategy tables in docs/benchmarks/serving.md).

The load test (``serve_load.py``) measures the server over HTTP; this benchmark isolates the engines.
C client threads each submit their next request as soon as their previous one finished, R requests
in all, each for a diff drawn at random (seeded; the same draws for every strategy), greedy, and it
reports generated tokens/s, p50/p99 latency and p50 time to first token (the first "text" event) for

- ``base``: the batching engine with every request for the base (no diff: the ceiling),
- ``merged``: one request at a time, merge on switch (``Engine``, today's server),
- ``mixed`` / ``auto``: continuous batching with per-row unmerged diffs (``BatchingEngine``),
- ``peft``: D LoRA adapters in one PEFT model at the rank whose trainable count matches a diff
  (``lora_rank_matching``), mixed-adapter ``generate(..., adapter_names=[...])``. PEFT has no continuous
  batching: its clients go in static batches of C (a batch waits for all C, and for its longest row).

The model is a random-init ``--size tiny|small`` Llama, or ``--model`` (an alias such as
``smollm2-135m`` or a local directory: real weights, tokenizer and chat-template prompts). Diffs are
random (entries and values, seeded) at ``--density`` over all 7 projections: they measure cost, not
quality. EOS is switched off in the model's generation config so every request makes exactly
``--max-tokens`` tokens in every strategy. Results go to ``--json`` after every cell, so a cut run keeps them.

    python -m sparseft.bench.serve_strategies --model smollm2-135m --diffs 64 8 1 --concurrency 16 32 \\
        --requests 64 --max-tokens 32 --threads 2 --json serving_strategies.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import LLAMA_PROJECTIONS, SparseConfig
from ..errors import DataFormatError
from .serve_load import random_llama
from .shapes import numbered_vocab, word_level_tokenizer

STRATEGIES = ["base", "merged", "mixed", "auto", "peft"]
# Written prompts, used when no --prompt-file is given (the real model needs real text to chew on).
TOPICS = ["the ocean", "a rainy morning", "learning to cook", "an old library", "city traffic", "a mountain hike",
          "the first day of school", "a broken clock"]
TASKS = ["Write one sentence about {}.", "Give two facts about {}.", "Describe {} to a child.",
         "Write a short poem about {}.", "List three words that go with {}.", "Explain why people like {}.",
         "Write a headline about {}.", "Tell a very short story about {}."]


# ---------------------------------------------------------------- what every cell serves


@dataclass
class Setup:
    """The base model (a fresh copy per engine), its tokenizer, the prompts and the random diffs."""

    name: str
    load: Callable[[], nn.Module]
    tokenizer: Any
    prompts: list[list[int]]
    diffs: list[Any] = field(default_factory=list)  # SparseDiff, max(--diffs) of them
    lora_rank: int = 1


def numbered_tokenizer(vocab_size: int):
    vocab = numbered_vocab(["<unk>", "<s>", "</s>"], vocab_size)
    return word_level_tokenizer(vocab, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def written_instructions(count: int) -> list[str]:
    return [TASKS[i % len(TASKS)].format(TOPICS[(i // len(TASKS)) % len(TOPICS)]) for i in range(count)]


def review_instructions(path: Path, count: int) -> list[str]:
    """Short instructions around the first ``count`` sentences of a TSV whose first column is text (SST-2)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    texts = [f"Is this movie review positive or negative? Answer, then explain briefly: {row[0].strip()}"
             for row in rows[:count] if row and row[0].strip()]
    if not texts:
        raise DataFormatError(f"{path}: no text rows after the header (expected a TSV whose first column is text)")
    return texts


def real_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    from ..serve.decoding import encode_chat, encode_text

    if getattr(tokenizer, "chat_template", None):
        return [encode_chat(tokenizer, [{"role": "user", "content": t}]) for t in texts]
    return [encode_text(tokenizer, t) for t in texts]


def build_setup(args: argparse.Namespace) -> Setup:
    if args.model:
        from ..loading import load_model, load_tokenizer

        tokenizer = load_tokenizer(args.model)
        texts = (review_instructions(args.prompt_file, args.requests) if args.prompt_file
                 else written_instructions(args.requests))
        setup = Setup(args.model, lambda: without_eos(load_model(args.model), tokenizer), tokenizer,
                      real_prompts(tokenizer, texts))
    else:
        vocab = random_llama(args.size).config.vocab_size
        tokenizer = numbered_tokenizer(vocab)
        gen = torch.Generator().manual_seed(0)
        prompts = [[1, *torch.randint(3, vocab, (15,), generator=gen).tolist()] for _ in range(args.requests)]
        setup = Setup(f"random-init {args.size}", lambda: without_eos(random_llama(args.size), tokenizer),
                      tokenizer, prompts)
    model = setup.load()
    prints = base_prints(model)
    setup.diffs = [random_diff(model, prints, args.density, seed) for seed in range(max(args.diffs))]
    from ..methods.lora import lora_rank_matching

    setup.lora_rank = args.lora_rank or lora_rank_matching(model, LLAMA_PROJECTIONS, setup.diffs[0].num_entries)
    return setup


def without_eos(model: nn.Module, tokenizer) -> nn.Module:
    """No EOS in the generation config: every strategy generates exactly max_tokens (cost, not text, is measured)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = pad if pad is not None else 0
    return model.eval()


def base_prints(model: nn.Module) -> dict[str, str]:
    """The base fingerprint a diff of all projections records (computed once: it hashes every projection)."""
    from ..base_match import fingerprint, weight_kind
    from ..diffio import target_weights

    weights = target_weights(model, SparseConfig(target_modules=LLAMA_PROJECTIONS))
    return {weight_kind(next(iter(weights.values()))): fingerprint(weights)}


def random_diff(model: nn.Module, prints: dict[str, str], density: float, seed: int, scale: float = 0.01):
    """A diff of ``density`` random entries per projection with small random values, recording the base ``prints``."""
    from ..diffio import SparseDiff, target_weights

    config = SparseConfig(density=density, scorer="random", seed=seed)
    weights = target_weights(model, config)
    gen = torch.Generator().manual_seed(seed)
    masks, values = {}, {}
    for name, w in weights.items():
        k = max(1, round(density * w.numel()))
        # Draw a few spare indices and keep k distinct ones: cheaper than a permutation of the whole weight.
        drawn = torch.randint(w.numel(), (k + k // 20 + 8,), generator=gen).unique()
        masks[name] = drawn[torch.randperm(drawn.numel(), generator=gen)[:k]].sort().values
        values[name] = torch.randn(masks[name].numel(), generator=gen) * scale
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    return SparseDiff(config, masks, values, shapes, base_fingerprint=prints)


# ---------------------------------------------------------------- the closed loop


@dataclass
class Timing:
    """One request as its client saw it (seconds from its submission)."""

    latency: float = 0.0
    ttft: float | None = None
    tokens: int = 0
    error: str | None = None


def closed_loop(run_one: Callable[[int], Timing], requests: int, concurrency: int) -> tuple[list[Timing], float]:
    """``concurrency`` clients take request numbers 0..requests-1 in turn, one at a time each; wall seconds."""
    timings: list[Timing] = [Timing(error="not run")] * requests
    numbers = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(numbers, None)
            if i is None:
                return
            timings[i] = run_one(i)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return timings, time.perf_counter() - start


def engine_request(engine, diff, prompt: list[int], max_tokens: int) -> Timing:
    """Submit one request and wait for it; TTFT is the first text event."""
    from ..serve import SamplingParams

    timing, done, start = Timing(), threading.Event(), time.perf_counter()

    def on_event(kind: str, payload: Any) -> None:
        if kind == "text" and timing.ttft is None:
            timing.ttft = time.perf_counter() - start
        elif kind == "done":
            timing.tokens = payload.completion_tokens
        elif kind == "error":
            timing.error = str(payload)
        if kind in ("done", "error"):
            timing.latency = time.perf_counter() - start
            done.set()

    engine.submit(diff, prompt, SamplingParams(max_tokens), on_event)
    done.wait()
    return timing


def summary(timings: list[Timing], seconds: float) -> dict[str, Any]:
    ok = [t for t in timings if t.error is None]
    latencies = sorted(t.latency for t in ok)
    ttfts = sorted(t.ttft for t in ok if t.ttft is not None)
    tokens = sum(t.tokens for t in ok)

    def pct(xs: list[float], q: float) -> float | None:
        return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else None

    return {"completed": len(ok), "errors": len(timings) - len(ok), "seconds": round(seconds, 2),
            "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1), "p50_ms": pct(latencies, 0.5),
            "p99_ms": pct(latencies, 0.99), "ttft_p50_ms": pct(ttfts, 0.5)}


# ---------------------------------------------------------------- one strategy, every concurrency


def engine_cell(setup: Setup, strategy: str, n_diffs: int, draws: list[int], c: int, args) -> dict[str, Any]:
    """A fresh engine for ``strategy`` over the first ``n_diffs`` diffs, under ``c`` clients."""
    from ..serve import BatchingEngine, Engine
    from ..serve.registry import DiffVersion

    model = setup.load()
    if strategy == "merged":
        engine = Engine(model, setup.tokenizer)
    else:
        engine = BatchingEngine(model, setup.tokenizer, strategy="mixed" if strategy == "base" else strategy,
                                max_batch_size=args.batch or c)
    versions = [DiffVersion(f"d{i}", 1, "random", "", d.num_entries, time.time(),
                            engine.validated_entries(d, f"random diff d{i}"))
                for i, d in enumerate(setup.diffs[:n_diffs])] if strategy != "base" else []
    if strategy in ("mixed", "auto"):
        engine.mixed.add(versions)  # a server loads its diffs before traffic: one table build, not timed
    engine.start()
    engine_request(engine, versions[0] if versions else None, setup.prompts[0], 2)  # warm-up, not timed
    timings, seconds = closed_loop(
        lambda i: engine_request(engine, versions[draws[i]] if versions else None,
                                 setup.prompts[i % len(setup.prompts)], args.max_tokens),
        args.requests, c)
    engine.stop()
    return {"strategy": strategy, "diffs": 0 if strategy == "base" else n_diffs, "concurrency": c,
            "swaps": engine.swaps, **summary(timings, seconds)}


def peft_model(setup: Setup, adapters: int):
    """``adapters`` LoRA adapters a0.. on all projections at the matched rank, B random (seeded) so each differs."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=setup.lora_rank, lora_alpha=2 * setup.lora_rank, target_modules=LLAMA_PROJECTIONS)
    model = get_peft_model(setup.load(), lora, adapter_name="a0")
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", lora)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    return model.eval()


def peft_cell(model, setup: Setup, n_diffs: int, draws: list[int], c: int, args) -> dict[str, Any]:
    """PEFT's mixed-adapter generate in static batches of C (left padding), each row naming its adapter."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class FirstToken(StoppingCriteria):  # called once per generated token: the first call is the TTFT
        def __init__(self):
            self.at = None

        def __call__(self, input_ids, scores, **kwargs):
            self.at = self.at or time.perf_counter()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    pad = model.generation_config.pad_token_id
    timings = []
    start = time.perf_counter()
    for first in range(0, args.requests, c):
        numbers = range(first, min(first + c, args.requests))
        group = [setup.prompts[i % len(setup.prompts)] for i in numbers]
        width = max(map(len, group))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        watch, began = FirstToken(), time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_tokens,
                                 do_sample=False, adapter_names=[f"a{draws[i]}" for i in numbers],
                                 stopping_criteria=StoppingCriteriaList([watch]))
        ended = time.perf_counter()
        timings += [Timing(ended - began, watch.at - began, out.shape[1] - width) for _ in numbers]
    return {"strategy": "peft", "diffs": n_diffs, "concurrency": c, "lora_rank": setup.lora_rank,
            "swaps": 0, **summary(timings, time.perf_counter() - start)}


# ---------------------------------------------------------------- the run, the targets, the table


def targets(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tracker's targets, per concurrency: with the most diffs, mixed/auto ≥ 0.8× base and ≥ peft; ≥ 5× merged."""
    def rate(strategy, diffs, c):
        return next((x["tokens_per_s"] for x in cells if (x["strategy"], x["diffs"], x["concurrency"]) ==
                     (strategy, diffs, c)), None)

    out = []
    most = max((x["diffs"] for x in cells), default=0)
    for c in sorted({x["concurrency"] for x in cells}):
        for strategy in ("mixed", "auto"):
            ours = rate(strategy, most, c)
            for peer, goal in (("base", 0.8), ("peft", 1.0), ("merged", 5.0)):
                theirs = rate(peer, 0 if peer == "base" else most, c)
                if ours is not None and theirs:
                    out.append({"strategy": strategy, "diffs": most, "concurrency": c, "versus": peer,
                                "goal": goal, "ratio": round(ours / theirs, 2), "met": ours / theirs >= goal})
    return out


def markdown(cells: list[dict[str, Any]]) -> str:
    lines = ["| diffs | strategy | C | done | tokens | gen tok/s | p50 ms | p99 ms | TTFT p50 ms | swaps |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for x in cells:
        lines.append(f"| {x['diffs']} | {x['strategy']} | {x['concurrency']} | {x['completed']}/"
                     f"{x['completed'] + x['errors']} | {x['tokens']} | {x['tokens_per_s']:.1f} | {x['p50_ms']} | "
                     f"{x['p99_ms']} | {x['ttft_p50_ms']} | {x['swaps']} |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_average": [round(x, 2) for x in os.getloadavg()]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--size", choices=["tiny", "small"], help="random-init Llama shape (default small)")
    where.add_argument("--model", help="an alias (smollm2-135m) or local model directory: real weights and tokenizer")
    p.add_argument("--prompt-file", type=Path, help="TSV whose first column is text (e.g. SST-2 dev), for --model")
    p.add_argument("--diffs", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=STRATEGIES)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--lora-rank", type=int, help="default: the rank matching a diff's entry count")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 32])
    p.add_argument("--batch", type=int, help="max batch size of the batching engines (default: the concurrency)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="seeds the diff drawn for each request")
    p.add_argument("--json", type=Path, help="results, rewritten after every cell")
    args = p.parse_args(argv)
    if not (1 <= args.requests <= 256 and 1 <= min(args.diffs) and max(args.diffs) <= 64
            and 1 <= args.max_tokens <= 64 and 1 <= min(args.concurrency) and max(args.concurrency) <= 64):
        p.error("bounds: 1 <= requests <= 256, 1 <= diffs <= 64, 1 <= max_tokens <= 64, 1 <= concurrency <= 64")
    if args.prompt_file and not (args.model and args.prompt_file.is_file()):
        p.error(f"--prompt-file {args.prompt_file}: needs --model and an existing TSV file")
    if not args.model:
        args.size = args.size or "small"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"before": machine(), "cells": []}
    setup = build_setup(args)
    report["config"] = {"model": setup.name, "diffs": args.diffs, "density": args.density,
                        "entries_per_diff": setup.diffs[0].num_entries, "lora_rank": setup.lora_rank,
                        "requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                        "prompt_tokens_mean": round(statistics.mean(map(len, setup.prompts)), 1),
                        "batch": args.batch or "concurrency", "greedy": True, "eos": "off", "seed": args.seed}
    print(json.dumps({**report["before"], **report["config"]}), flush=True)

    def record(cell: Callable[..., dict[str, Any]], *cell_args: Any) -> None:
        began = time.perf_counter()
        x = cell(*cell_args)
        x["cell_wall_s"], x["load_average"] = round(time.perf_counter() - began, 1), round(os.getloadavg()[0], 2)
        report["cells"].append(x)
        print(json.dumps(x), flush=True)
        report["targets"], report["after"] = targets(report["cells"]), machine()
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")

    for c in args.concurrency if "base" in args.strategies else []:
        record(engine_cell, setup, "base", 0, [], c, args)
    for n in args.diffs:
        rng = random.Random(args.seed)
        draws = [rng.randrange(n) for _ in range(args.requests)]
        for strategy in [s for s in args.strategies if s != "base"]:
            model = peft_model(setup, n) if strategy == "peft" else None  # built once for every concurrency
            for c in args.concurrency:
                if strategy == "peft":
                    record(peft_cell, model, setup, n, draws, c, args)
                else:
                    record(engine_cell, setup, strategy, n, draws, c, args)
            del model
    print(markdown(report["cells"]))
    for t in report.get("targets", []):
        print(f"{t['strategy']} ({t['diffs']} diffs, C={t['concurrency']}) vs {t['versus']}: "
              f"{t['ratio']}× (goal {t['goal']}×) {'met' if t['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
