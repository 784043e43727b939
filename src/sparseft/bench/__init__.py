"""Benchmarks: full fine-tuning vs LoRA vs sparse side by side (grid), their plots and the cost report;
``gpu_step`` and ``backward_cpu`` time one training step of each method, ``reselect_step`` one
re-selection, ``select_memory`` what selection costs in time and memory, ``serve_load`` the server
under load. ``shapes`` holds the random-init model shapes (and tiny tokenizers) they and the tests build.

Example:
    >>> from sparseft.bench import load_bench_config, run_grid, write_report
    >>> results = run_grid(load_bench_config("examples/bench/tiny.yaml"), "runs/bench-tiny")  # doctest: +SKIP
    >>> write_report("runs/bench-tiny/results.json", html_page=True)  # doctest: +SKIP
"""

from .config import BenchConfig, RunSpec, load_bench_config
from .grid import run_grid
from .report import write_report
from .results import read_results, schema_problems

__all__ = ["BenchConfig", "RunSpec", "load_bench_config", "read_results", "run_grid", "schema_problems", "write_report"]
