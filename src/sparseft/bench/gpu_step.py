"""Cost of one fine-tuning step: full FT vs PEFT LoRA vs sparseft (old path and new path), one run.

On CUDA it builds random-init Llama models of real sizes (the 1B and 3B of ``sparseft.bench.shapes``;
bf16 weights, SDPA attention), and for each variant times AdamW steps on a batch of random tokens
(default 8 × 512): the median step over ``--steps`` after ``--warmup``, the peak memory, and the share
of the ~4·N·T FLOP floor (forward + input gradients, no weight-gradient product) at the matmul rate
measured on the card.
It prints one Markdown table and writes it (plus JSON rows) next to ``--out``.

Variants:
    full        every weight trainable
    lora        PEFT LoRA rank ``--lora-rank`` on every projection
    sparse_old  sparseft at each density, first implementation: dense dW then gather, W + S copied
    sparse_new  sparseft at each density, SDDMM backward (Triton on CUDA) and in-place W + S

    python -m sparseft.bench.gpu_step --out docs/benchmarks/gpu_step.md          # one H200: est. 3-4 min
    python -m sparseft.bench.gpu_step --device cpu --tiny --out /tmp/step.md      # smoke test, seconds
    python -m sparseft.bench.gpu_step --device cpu --sizes smollm2-135m --batch 8 --seq 128 \\
        --lora-rank 8 --threads 2 --isolate --out docs/benchmarks/cpu_step.md     # the CPU target

``--isolate`` runs each variant in its own process, so peak RSS on CPU is per variant (RSS can't be
reset inside a process); on CUDA the peak is reset between variants instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import DTYPES, LLAMA_PROJECTIONS, SparseConfig
from ..sparse_linear import set_kernels
from ..targets import find_targets
from .shapes import SHAPES, build_llama

VARIANTS = ("full", "lora", "sparse_old", "sparse_new")


@dataclass
class StepResult:
    size: str
    variant: str
    density: float | None
    trainable: int
    step_ms: float
    peak_gib: float
    floor_share: float | None  # (4·N·T FLOP / measured matmul rate) / step time
    cpu_ms: float | None = None  # CPU: process CPU time per step (all threads), steadier than wall on a shared machine


# ---------------------------------------------------------------- building blocks


def build_model(size: str, device: torch.device, dtype: torch.dtype, seq_len: int):
    """A random-init LlamaForCausalLM of shape ``size``, created directly on ``device`` in ``dtype``."""
    model = build_llama(size, seed=0, dtype=dtype, device=device, min_positions=seq_len, attn_implementation="sdpa")
    model.config.use_cache = False
    return model.train()


def random_masks(model, density: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """``density`` of every projection's entries, uniformly at random, made on the weights' device.

    (sparseft.select's random scorer sorts a score per entry on CPU: right for real runs, too slow
    to set up a 3B benchmark in seconds; the step cost does not depend on how entries were chosen.)
    """
    gen_device = next(model.parameters()).device
    gen = torch.Generator(device=gen_device).manual_seed(seed)
    masks = {}
    for name, layer in find_targets(model, LLAMA_PROJECTIONS).items():
        numel = layer.weight.numel()
        k = max(1, round(density * numel))
        masks[name] = torch.sort(torch.randperm(numel, generator=gen, device=gen_device)[:k]).values
    return masks


def prepare(model, variant: str, density: float | None, lora_rank: int):
    """(model to step, its trainable parameters) for ``variant``."""
    if variant == "full":
        return model, [p for p in model.parameters()]
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                         target_modules=list(LLAMA_PROJECTIONS), task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, cfg)
        return peft_model, [p for p in peft_model.parameters() if p.requires_grad]
    from ..model import get_sparse_model

    sparse = get_sparse_model(model, SparseConfig(density=density), masks=random_masks(model, density))
    if variant == "sparse_old":
        set_kernels(sparse, backend="dense_gather", forward_mode="copy")
    else:
        set_kernels(sparse, backend="auto", forward_mode="inplace")
    return sparse, sparse.sparse_parameters()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, params, batch: dict, device: torch.device, steps: int, warmup: int):
    """(wall seconds, process CPU seconds) per AdamW step (forward, backward, step, zero_grad), after ``warmup``."""
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    wall, cpu = [], []
    for i in range(warmup + steps):
        synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if i >= warmup:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 4096, repeats: int = 10) -> float:
    """Dense matmul FLOP/s on ``device`` in ``dtype`` (the rate the step floor is priced at)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def matmul_params(model) -> int:
    """N for the floor: weights that take part in matmuls (every Linear, including the LM head)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB


# ---------------------------------------------------------------- one variant, all variants


def run_variant(args, size: str, variant: str, density: float | None, rate: float | None) -> StepResult:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(size, device, dtype, args.seq)
    n_matmul, vocab_size = matmul_params(model), model.config.vocab_size
    model, params = prepare(model, variant, density, args.lora_rank)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (args.batch, args.seq), generator=gen).to(device)
    wall, cpu = time_steps(model, params, {"input_ids": ids, "labels": ids}, device, args.steps, args.warmup)
    step_s = statistics.median(wall)
    floor_share = 4 * n_matmul * args.batch * args.seq / rate / step_s if rate else None
    cpu_ms = statistics.median(cpu) * 1e3 if device.type == "cpu" else None
    result = StepResult(size, variant, density, sum(p.numel() for p in params), step_s * 1e3, peak_gib(device),
                        floor_share, cpu_ms)
    del model, params
    gc.collect()
    return result


def run_isolated(args, size: str, variant: str, density: float | None) -> StepResult:
    """``run_variant`` in a fresh interpreter, so its peak RSS is its own."""
    cmd = [sys.executable, "-m", "sparseft.bench.gpu_step", "--one", f"{size}:{variant}:{density}",
           "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch), "--seq", str(args.seq),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--lora-rank", str(args.lora_rank),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return StepResult(**json.loads(out.strip().splitlines()[-1]))


def plan(args) -> list[tuple[str, str, float | None]]:
    rows = []
    for size in args.sizes:
        for variant in args.variants:
            if variant.startswith("sparse"):
                rows += [(size, variant, d) for d in args.densities]
            else:
                rows.append((size, variant, None))
    return rows


def markdown_table(results: list[StepResult]) -> str:
    """One table; each row's step also as a fraction of the same size's full-FT and LoRA step."""
    base = {(r.size, r.variant): r for r in results if r.variant in ("full", "lora")}
    with_cpu = any(r.cpu_ms is not None for r in results)
    header = "| size | variant | density | trainable | step ms | peak GiB | × full | × LoRA |"
    header += " CPU ms/step | CPU × LoRA |" if with_cpu else " floor share |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        full, lora = base.get((r.size, "full")), base.get((r.size, "lora"))
        ratio = lambda b, a="step_ms": f"{getattr(r, a) / getattr(b, a):.2f}" if b else "–"  # noqa: E731
        density = "" if r.density is None else f"{r.density:.1%}"
        line = (f"| {r.size} | {r.variant} | {density} | {r.trainable:,} | {r.step_ms:.1f} | {r.peak_gib:.2f} "
                f"| {ratio(full)} | {ratio(lora)} |")
        if with_cpu:
            line += f" {r.cpu_ms:.0f} | {ratio(lora, 'cpu_ms')} |"
        else:
            line += f" {'' if r.floor_share is None else f'{r.floor_share:.0%}'} |"
        lines.append(line)
    return "\n".join(lines)


def machine_line(args, rate: float | None) -> str:
    if args.device.startswith("cuda"):
        card = torch.cuda.get_device_name(torch.device(args.device))
    else:
        card = f"CPU {platform.processor() or platform.machine()}, {args.threads} threads"
    rate_text = f", measured {args.dtype} matmul {rate / 1e12:.0f} TFLOP/s" if rate else ""
    return (f"{card}; torch {torch.__version__}{rate_text}; {args.dtype}, batch {args.batch} × {args.seq}, "
            f"AdamW, median of {args.steps} steps after {args.warmup} warm-up")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sparseft.bench.gpu_step", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model, 2 × 16 tokens, 2 steps: a smoke test")
    parser.add_argument("--sizes", nargs="+", default=["1b", "3b"], choices=sorted(SHAPES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--densities", nargs="+", type=float, default=[0.01, 0.001])
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--isolate", action="store_true", help="one process per variant (per-variant peak RSS)")
    parser.add_argument("--out", default="gpu_step.md", help="Markdown table; JSON rows go next to it")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # size:variant:density, used by --isolate
    args = parser.parse_args(argv)
    if args.tiny:
        args.sizes, args.batch, args.seq, args.steps, args.warmup = ["tiny"], 2, 16, 2, 1
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available; use --device cpu (with --tiny for a smoke test)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        size, variant, density = args.one.split(":")
        result = run_variant(args, size, variant, None if density == "None" else float(density), None)
        print(json.dumps(asdict(result)))
        return 0
    device = torch.device(args.device)
    rate = matmul_rate(device, DTYPES[args.dtype]) if device.type == "cuda" else None
    results = []
    for size, variant, density in plan(args):
        result = run_isolated(args, size, variant, density) if args.isolate else run_variant(args, size, variant, density, rate)
        results.append(result)
        print(f"{size} {variant} {density}: {result.step_ms:.1f} ms, {result.peak_gib:.2f} GiB", file=sys.stderr, flush=True)
    table = markdown_table(results)
    command = "python -m sparseft.bench.gpu_step " + " ".join(argv if argv is not None else sys.argv[1:])
    text = f"{machine_line(args, rate)}\n\nCommand: `{command}`\n\n{table}\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
