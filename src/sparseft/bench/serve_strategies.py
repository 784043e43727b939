"""In-process throughput of the serving strategies on one offline burst (the table in docs/benchmarks/serving.md).

The load test (``serve_load.py``) measures the server over HTTP; this benchmark mode isolates the
engines: R greedy requests, spread round-robin over D diffs, are all queued at once and the wall
time until the last one finishes is measured, for

- ``base batched``: the batching engine with every request for the base (no diff: the ceiling),
- ``merged``: one request at a time, merge on switch (``Engine``),
- ``mixed`` / ``auto``: continuous batching with per-row unmerged diffs (``BatchingEngine``),
- ``peft multi-lora``: D LoRA adapters in one PEFT model, static batches of the same size, each row
  naming its adapter (``generate(..., adapter_names=[...])``).

Bounded: the ``tiny`` and ``small`` shapes of ``bench.shapes`` only, at most 256 requests and 64 diffs.

    python -m sparseft.bench.serve_strategies --size small --diffs 1 8 64 --requests 64 --max-tokens 16
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from .serve_load import build_fixture, random_llama
from .shapes import SHAPES, numbered_vocab, word_level_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def numbered_tokenizer(vocab_size: int):
    vocab = numbered_vocab(["<unk>", "<s>", "</s>"], vocab_size)
    return word_level_tokenizer(vocab, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def burst(size: str, strategy: str, diff_paths: list[Path], prompts: list[list[int]], max_tokens: int,
          batch: int) -> tuple[float, int]:
    """Seconds until all requests finished and tokens generated, for one engine strategy."""
    from ..serve import BatchingEngine, DiffRegistry, Engine, SamplingParams

    model = random_llama(size)
    tokenizer = numbered_tokenizer(model.config.vocab_size)
    if strategy == "merged":
        engine = Engine(model, tokenizer)
    else:
        engine = BatchingEngine(model, tokenizer, strategy="mixed" if strategy == "base" else strategy,
                                max_batch_size=batch)
    registry = DiffRegistry(engine.validated_entries)
    diffs = [registry.load(f"d{i}", p) for i, p in enumerate(diff_paths)]
    done, tokens, lock = threading.Semaphore(0), [0], threading.Lock()

    def on_event(kind, payload):
        if kind == "done":
            with lock:
                tokens[0] += payload.completion_tokens
        if kind in ("done", "error"):
            done.release()

    engine.start()
    start = time.perf_counter()
    for k, prompt in enumerate(prompts):
        diff = None if strategy == "base" else diffs[k % len(diffs)]
        engine.submit(diff, prompt, SamplingParams(max_tokens), on_event)
    for _ in prompts:
        done.acquire()
    seconds = time.perf_counter() - start
    engine.stop()
    return seconds, tokens[0]


def peft_burst(size: str, adapters: int, rank: int, prompts: list[list[int]], max_tokens: int,
               batch: int) -> tuple[float, int]:
    """The same burst through PEFT's mixed-adapter batched generate (static batches, left padding)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(random_llama(size), LoraConfig(r=rank, target_modules=TARGETS), adapter_name="a0")
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", LoraConfig(r=rank, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    model.eval()
    tokens, start = 0, time.perf_counter()
    for first in range(0, len(prompts), batch):
        group = prompts[first : first + batch]
        width = max(map(len, group))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        names = [f"a{(first + j) % adapters}" for j in range(len(group))]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                                 adapter_names=names, pad_token_id=0)
        tokens += int((out[:, width:] != 0).sum())
    return time.perf_counter() - start, tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["tiny", "small"], default="small")
    p.add_argument("--diffs", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="max batch size of the batching engines and of PEFT")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if not (1 <= args.requests <= 256 and max(args.diffs) <= 64 and args.max_tokens <= 64):
        p.error("bounds: requests <= 256, diffs <= 64, max_tokens <= 64")
    torch.set_num_threads(args.threads)
    vocab = SHAPES[args.size]["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    prompts = [[1, *torch.randint(3, vocab, (15,), generator=gen).tolist()] for _ in range(args.requests)]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    print("| diffs | strategy | seconds | gen tok/s |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        _, paths = build_fixture(Path(tmp), args.size, max(args.diffs), args.density)
        seconds, tokens = burst(args.size, "base", paths[:1], prompts, args.max_tokens, args.batch)
        print(f"| 0 | base batched | {seconds:.2f} | {tokens / seconds:.0f} |", flush=True)
        for n in args.diffs:
            for strategy in ("merged", "mixed", "auto"):
                seconds, tokens = burst(args.size, strategy, paths[:n], prompts, args.max_tokens, args.batch)
                print(f"| {n} | {strategy} | {seconds:.2f} | {tokens / seconds:.0f} |", flush=True)
            seconds, tokens = peft_burst(args.size, n, args.lora_rank, prompts, args.max_tokens, args.batch)
            print(f"| {n} | peft multi-lora r={args.lora_rank} | {seconds:.2f} | {tokens / seconds:.0f} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
