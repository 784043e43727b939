"""The SDDMM check: its CPU smoke mode (the PyTorch SDDMM in Triton's place) and the crossover it reports."""

import json

from sparseft.bench.sddmm_gpu import SddmmPoint, crossovers, main, markdown


def point(shape, density, kernel_ms, dense_ms, rel_error=1e-7):
    return SddmmPoint(shape, 8, 8, 4, density, 1, "triton", 0.0, rel_error, 1e-3, kernel_ms, dense_ms)


def test_tiny_cpu_mode_checks_every_point_against_float64(tmp_path):
    out = tmp_path / "sddmm.md"
    assert main(["--device", "cpu", "--tiny", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [(r["shape"], r["density"]) for r in rows] == [
        ("tiny 64×32", 0.01), ("tiny 64×32", 0.1), ("tiny 32×64", 0.01), ("tiny 32×64", 0.1)]
    assert all(r["kernel"] == "sddmm_columns" and r["rel_error"] < 1e-5 for r in rows)  # fp32 sums of bf16 products
    assert all(r["dense_rel_error"] > r["rel_error"] for r in rows)  # the bf16 GEMM rounds its output
    assert all(r["k"] == round(r["density"] * 64 * 32) for r in rows)
    assert "stands in for Triton" in out.read_text()


def test_crossover_is_the_highest_density_where_the_kernel_wins_and_the_suggestion_the_smallest():
    points = [point("a", 0.001, 1, 5), point("a", 0.01, 2, 5), point("a", 0.1, 9, 5),
              point("b", 0.001, 1, 5), point("b", 0.01, 6, 5), point("c", 0.001, 6, 5)]
    assert crossovers(points) == {"a": 0.01, "b": 0.001, "c": None}
    assert "suggests 0 (the kernel loses at some shape" in markdown(points, "h")
    assert "suggests 0.001." in markdown(points[:5], "h")


def test_a_wrong_kernel_output_is_flagged():
    text = markdown([point("a", 0.01, 1, 2, rel_error=float("inf"))], "h")
    assert "**NO**" in text and "**1 over it**" in text
