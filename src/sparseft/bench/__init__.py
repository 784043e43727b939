"""Benchmarks: full fine-tuning vs LoRA vs sparse side by side (grid), their plots and the cost report;
``gpu_step`` and ``backward_cpu`` time one training step of each method, ``reselect_step`` one
re-selection, ``select_memory`` what selection costs in time and memory, ``serve_load`` the server
under load. ``shapes`` holds the random-init model shapes (and tiny tokenizers) they and the tests build.

Example:
    >>> from sparseft.bench import load_bench_config, run_grid, write_report
    >>> results = run_grid(load_bench_config("examples/bench/tiny.yaml"), "runs/bench-tiny")  # doctest: +SKIP
    >>> write_report("runs/bench-tiny/results.json", html_page=True)  # doctest: +SKIP
"""

from importlib import import_module

# Imported on first use, so that `sparseft.bench.shapes` (which every test fixture builds through)
# does not pull in matplotlib and the grid machinery.
_EXPORTS = {
    "BenchConfig": "config", "RunSpec": "config", "load_bench_config": "config", "run_grid": "grid",
    "write_report": "report", "read_results": "results", "schema_problems": "results",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
