"""The Triton SDDMM on the GPU: checked against a float64 reference, and timed against dense GEMM + gather.

For projection shapes of SmolLM2-135M, Llama-1B and Llama-3B and densities from 1e-4 to 0.1, with
fresh random bf16 activations (``--tokens`` rows, default gpu_step's 8 × 512) and sorted random entries:

- error: the kernel's k values against the same entries of dYᵀX computed in float64 from the same
  bf16 inputs: max |out − ref| and ‖out − ref‖ / ‖ref‖ (float32 accumulation should land far under
  1e-3; NaN never passes). The dense path's error (a bf16 GEMM, rounded to bf16) is shown beside it;
- time: the median over ``--reps`` launches (CUDA events) of the kernel and of ``dense_gather``
  (the dense GEMM then a gather: what ``auto`` runs above ``GPU_SDDMM_MAX_DENSITY``).

Per shape, the crossover is the highest density at which the kernel is still faster; the smallest
crossover over the shapes is what ``GPU_SDDMM_MAX_DENSITY`` (``sparseft/kernels/__init__.py``) should be
so the kernel never runs where the GEMM is faster.

    python -m sparseft.bench.sddmm_gpu --out docs/benchmarks/gpu_sddmm.md     # one H200: est. 30 s
    python -m sparseft.bench.sddmm_gpu --device cpu --tiny --out /tmp/s.md     # smoke test, seconds

On CPU, Triton has no device to run on (its interpreter is far too slow to time), so the smoke mode
checks and times the PyTorch SDDMM (``sddmm_columns``) in its place: the harness is what it tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..kernels import GPU_SDDMM_MAX_DENSITY
from ..kernels.reference import dense_gather, sddmm_columns
from .gpu_fit import sample_entries

# (out_features, in_features) of one projection: square attention, an MLP up (wide out) and down (wide in).
PROJECTIONS = {
    "smollm2 q 576×576": (576, 576), "smollm2 up 1536×576": (1536, 576), "smollm2 down 576×1536": (576, 1536),
    "1b q 2048×2048": (2048, 2048), "1b k 512×2048": (512, 2048), "1b up 8192×2048": (8192, 2048),
    "1b down 2048×8192": (2048, 8192), "3b q 3072×3072": (3072, 3072), "3b up 8192×3072": (8192, 3072),
    "3b down 3072×8192": (3072, 8192),
}
TINY_PROJECTIONS = {"tiny 64×32": (64, 32), "tiny 32×64": (32, 64)}
DENSITIES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
MAX_REL_ERROR = 1e-3


@dataclass
class SddmmPoint:
    shape: str
    out_features: int
    in_features: int
    tokens: int
    density: float
    k: int
    kernel: str  # triton on CUDA; sddmm_columns in the CPU smoke mode
    max_abs_error: float
    rel_error: float
    dense_rel_error: float
    kernel_ms: float
    dense_ms: float


def kernel_for(device: torch.device):
    """(name, function) of the SDDMM under test on ``device``."""
    if device.type == "cuda":
        from ..kernels.triton_sddmm import sampled_weight_grad_triton

        return "triton", sampled_weight_grad_triton
    return "sddmm_columns", sddmm_columns


def median_ms(fn, device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; inf when out holds a NaN or inf."""
    out = out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def measure_shape(name: str, n_out: int, n_in: int, args, gen: torch.Generator) -> list[SddmmPoint]:
    """Every density at one shape, with fresh inputs per shape and fresh entries per density."""
    device = torch.device(args.device)
    kernel_name, kernel = kernel_for(device)
    grad_out = torch.randn(args.tokens, n_out, generator=gen, device=device).to(torch.bfloat16)
    x = torch.randn(args.tokens, n_in, generator=gen, device=device).to(torch.bfloat16)
    dense_ref = (grad_out.double().T @ x.double()).reshape(-1)  # every entry once, in float64
    points = []
    for density in args.densities:
        k = max(1, round(density * n_out * n_in))
        indices = sample_entries(n_out * n_in, k, gen, device)
        ref = dense_ref[indices]
        out = kernel(grad_out, x, indices)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        points.append(SddmmPoint(
            name, n_out, n_in, args.tokens, density, k, kernel_name,
            max_abs_error=float((out.double() - ref).abs().max()), rel_error=relative_error(out, ref),
            dense_rel_error=relative_error(dense_gather(grad_out, x, indices), ref),
            kernel_ms=median_ms(lambda: kernel(grad_out, x, indices), device, args.reps),
            dense_ms=median_ms(lambda: dense_gather(grad_out, x, indices), device, args.reps),
        ))
    return points


def crossovers(points: list[SddmmPoint]) -> dict[str, float | None]:
    """Per shape, the highest density at which the kernel beats the dense path (None: never)."""
    best: dict[str, float | None] = {}
    for p in points:
        best.setdefault(p.shape, None)
        if p.kernel_ms < p.dense_ms:
            best[p.shape] = max(p.density, best[p.shape] or 0.0)
    return best


def markdown(points: list[SddmmPoint], header: str) -> str:
    lines = [header, "", "| shape | density | k | max abs err | rel err | dense rel err | kernel ms | dense ms "
             "| kernel / dense | ok |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        ok = "yes" if p.rel_error < MAX_REL_ERROR else "**NO**"
        lines.append(f"| {p.shape} | {p.density:g} | {p.k:,} | {p.max_abs_error:.2e} | {p.rel_error:.2e} "
                     f"| {p.dense_rel_error:.2e} | {p.kernel_ms:.3f} | {p.dense_ms:.3f} "
                     f"| {p.kernel_ms / p.dense_ms:.2f} | {ok} |")
    cross = crossovers(points)
    lines += ["", "Crossover (highest density at which the kernel is faster): "
              + "; ".join(f"{s}: {'never' if d is None else f'{d:g}'}" for s, d in cross.items())]
    known = [d for d in cross.values() if d is not None]
    suggestion = f"{min(known):g}" if len(known) == len(cross) else "0 (the kernel loses at some shape at every density)"
    bad = sum(p.rel_error >= MAX_REL_ERROR for p in points)
    lines += ["", f"GPU_SDDMM_MAX_DENSITY: now {GPU_SDDMM_MAX_DENSITY:g}; the smallest crossover above suggests "
              f"{suggestion}.", "", f"Accuracy: {len(points) - bad} of {len(points)} points under rel err "
              f"{MAX_REL_ERROR:g}" + ("" if not bad else f"; **{bad} over it**")]
    return "\n".join(lines) + "\n"


def machine_line(args) -> str:
    device = torch.device(args.device)
    if device.type == "cuda":
        import triton

        where = f"{torch.cuda.get_device_name(device)}; triton {triton.__version__}"
    else:
        where = "CPU (smoke mode: the PyTorch SDDMM stands in for Triton)"
    return (f"{where}; torch {torch.__version__}; bf16 activations, {args.tokens} tokens; "
            f"median of {args.reps} launches; error against float64 dYᵀX on the same bf16 inputs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sparseft.bench.sddmm_gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="two tiny shapes, 64 tokens: a smoke test")
    parser.add_argument("--shapes", nargs="+", default=list(PROJECTIONS), choices=[*PROJECTIONS, *TINY_PROJECTIONS])
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    parser.add_argument("--tokens", type=int, default=8 * 512)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default="gpu_sddmm.md", help="Markdown table; JSON rows go next to it")
    args = parser.parse_args(argv)
    if args.tiny:
        args.shapes, args.densities, args.tokens, args.reps = list(TINY_PROJECTIONS), [0.01, 0.1], 64, 3
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available; use --device cpu --tiny for a smoke test")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gen = torch.Generator(device=args.device).manual_seed(0)
    points = []
    for name in args.shapes:
        n_out, n_in = {**PROJECTIONS, **TINY_PROJECTIONS}[name]
        points += measure_shape(name, n_out, n_in, args, gen)
        print(f"{name}: done", file=sys.stderr, flush=True)
    command = "python -m sparseft.bench.sddmm_gpu " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(points, f"{machine_line(args)}\n\nCommand: `{command}`")
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps([asdict(p) for p in points], indent=2) + "\n")
    return 0 if all(p.rel_error < MAX_REL_ERROR for p in points) else 1


if __name__ == "__main__":
    raise SystemExit(main())
