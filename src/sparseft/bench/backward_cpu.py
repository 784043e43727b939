"""CPU cost of the values' gradient, per PyTorch path: where the constants of the CPU cost model come from.

For SmolLM2-135M projection shapes and a few densities it times ``dense_gather``, ``sddmm_columns``
and ``sddmm_csr`` as process CPU time with one thread (steady on a shared machine, where wall time
is not), checks each against the float64 reference, and prints a Markdown table with the path the
cost model (``kernels.reference.choose_method``) picks.

    python -m sparseft.bench.backward_cpu --tokens 1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..kernels.reference import METHODS, choose_method, sampled_weight_grad_torch

SHAPES = {"q/o 576×576": (576, 576), "k/v 192×576": (192, 576), "gate/up 1536×576": (1536, 576),
          "down 576×1536": (576, 1536)}


def cpu_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--densities", nargs="+", type=float, default=[0.02, 0.01, 0.005, 0.001])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    print(f"T = {args.tokens} tokens, float32, 1 thread, median process CPU ms of {args.repeats}\n")
    print("| shape | density | k | " + " | ".join(METHODS) + " | model picks |")
    print("|---|---|---|" + "---|" * len(METHODS) + "---|")
    for label, (n_out, n_in) in SHAPES.items():
        g = torch.randn(args.tokens, n_out, generator=gen)
        x = torch.randn(args.tokens, n_in, generator=gen)
        for density in args.densities:
            k = max(1, round(density * n_out * n_in))
            idx = torch.sort(torch.randperm(n_out * n_in, generator=gen)[:k]).values
            want = (g.double().T @ x.double()).reshape(-1)[idx]
            cells = []
            for method in METHODS:
                got = sampled_weight_grad_torch(g, x, idx, method)
                torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)
                cells.append(f"{cpu_ms(lambda: sampled_weight_grad_torch(g, x, idx, method), args.repeats):.1f}")
            pick = choose_method(args.tokens, n_out, n_in, k)
            print(f"| {label} | {density:.1%} | {k:,} | " + " | ".join(cells) + f" | {pick} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
