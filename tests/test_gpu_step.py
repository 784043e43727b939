"""The step benchmark's tiny CPU mode runs end to end and reports what it measured."""

import json

from sparseft.bench.gpu_step import main, parse_args, plan
from sparseft.bench.shapes import SHAPES


def test_tiny_cpu_mode_writes_one_row_per_variant(tmp_path):
    out = tmp_path / "step.md"
    assert main(["--device", "cpu", "--tiny", "--densities", "0.01", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [(r["variant"], r["density"]) for r in rows] == [
        ("full", None), ("lora", None), ("sparse_old", 0.01), ("sparse_new", 0.01)
    ]
    assert all(r["step_ms"] > 0 and r["peak_gib"] > 0 and r["cpu_ms"] > 0 for r in rows)
    by_variant = {r["variant"]: r for r in rows}
    cfg = SHAPES["tiny"]
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # q k v o gate up down
    assert by_variant["lora"]["trainable"] == layers * 16 * sum(o + n for o, n in shapes)
    assert by_variant["sparse_new"]["trainable"] == layers * sum(max(1, round(0.01 * o * n)) for o, n in shapes)
    assert by_variant["sparse_old"]["trainable"] == by_variant["sparse_new"]["trainable"]
    table = out.read_text()
    assert "| tiny | sparse_new | 1.0% |" in table and "Command: `python -m sparseft.bench.gpu_step" in table


def test_plan_expands_densities_for_sparse_variants_only():
    args = parse_args(["--device", "cpu", "--sizes", "tiny", "--densities", "0.01", "0.001"])
    assert [(v, d) for _, v, d in plan(args)] == [
        ("full", None), ("lora", None), ("sparse_old", 0.01), ("sparse_old", 0.001),
        ("sparse_new", 0.01), ("sparse_new", 0.001),
    ]
