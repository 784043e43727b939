"""The GPU fit probe: its layer-by-layer build gives a working Llama, and its CPU smoke mode runs end to end."""

import json

import torch

from sparseft.bench.gpu_fit import (build_layerwise, enable_checkpointing, lower_bound_bytes, main, meta_model,
                                    parameter_count, train_steps, wrap_sparse)
from sparseft.bench.shapes import build_llama
from sparseft.quantize import is_quantized


def test_layerwise_bf16_model_computes_what_the_hf_model_computes_with_its_weights():
    model = build_layerwise("tiny", "bf16", torch.device("cpu"), seed=3)
    reference = build_llama("tiny", dtype=torch.bfloat16)
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert torch.isfinite(q).all() and 0.015 < q.float().std() < 0.025  # initializer_range 0.02, not leftover memory
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    again = build_layerwise("tiny", "bf16", torch.device("cpu"), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_layerwise_nf4_model_quantizes_every_decoder_projection_and_trains_its_sparse_values():
    model = build_layerwise("tiny", "nf4", torch.device("cpu"), seq=16)
    projections = [m for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    assert len(projections) == 2 * 7 and all(is_quantized(m.weight) for m in projections)
    assert not is_quantized(model.lm_head.weight)  # the head stays bf16, as in QLoRA
    enable_checkpointing(model)
    model.train()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    sparse = wrap_sparse(model, 0.05)
    assert {layer.forward_mode for layer in sparse.sparse_layers().values()} == {"unmerged"}
    before = [v.detach().clone() for v in sparse.sparse_parameters()]
    assert train_steps(sparse, torch.device("cpu"), steps=2, batch=1, seq=16, vocab=128) > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, sparse.sparse_parameters()))


def test_sizes_come_from_the_config_alone():
    for shape in ("tiny", "1b", "70b"):
        assert parameter_count(shape) == sum(p.numel() for p in meta_model(shape, 0).parameters())
    # Llama 3 70B: 141 GB of bf16 weights, 36 GB as nf4 codes (+ bf16 embeddings and head, 4.2 GB)
    assert 146 * 2**30 < lower_bound_bytes("70b", "bf16", 0.01) < 148 * 2**30
    assert 51 * 2**30 < lower_bound_bytes("70b", "nf4", 0.01) < 53 * 2**30


def test_ladder_skips_what_cannot_fit_tries_downwards_and_stops_at_the_first_fit(monkeypatch):
    from sparseft.bench import gpu_fit

    tried = []

    def fake_try(args, shape, base, density, timeout_s):
        tried.append((shape, base, density))
        status = "fits" if shape == "1b" or base == "nf4" else "oom-step"
        return gpu_fit.FitResult(shape, base, density, status, parameter_count(shape), peak_gib=1.0)

    monkeypatch.setattr(gpu_fit, "run_isolated", fake_try)
    monkeypatch.setattr(gpu_fit, "card_bytes", lambda device: 140 * 2**30)
    args = gpu_fit.parse_args(["--device", "cpu", "--ladder", "70b", "8b", "1b", "--anchors", "65b:nf4:0.001"])
    results = gpu_fit.run_ladder(args, write=lambda rows: None)
    assert tried == [("8b", "bf16", 0.01), ("1b", "bf16", 0.01), ("70b", "nf4", 0.01), ("65b", "nf4", 0.001)]
    assert [(r.shape, r.base, r.status) for r in results][0] == ("70b", "bf16", "skipped")  # 147 GiB > 140: not built
    best = gpu_fit.largest_fitting(results, 0.01)
    assert (best["bf16"].shape, best["nf4"].shape) == ("1b", "70b")


def test_a_base_that_cannot_be_built_here_is_tried_once(monkeypatch):
    from sparseft.bench import gpu_fit

    tried = []

    def fake_try(args, shape, base, density, timeout_s):
        tried.append((shape, base))
        status = "skipped" if base == "nf4" else "fits"
        return gpu_fit.FitResult(shape, base, density, status, parameter_count(shape), note="torchao missing")

    monkeypatch.setattr(gpu_fit, "run_isolated", fake_try)
    args = gpu_fit.parse_args(["--device", "cpu", "--ladder", "8b", "1b", "--anchors", "65b:nf4:0.001"])
    gpu_fit.run_ladder(args, write=lambda rows: None)
    assert tried == [("8b", "bf16"), ("8b", "nf4")]


def test_tiny_cpu_mode_runs_each_base_in_its_own_process(tmp_path):
    out = tmp_path / "fit.md"
    assert main(["--device", "cpu", "--tiny", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [(r["shape"], r["base"], r["status"]) for r in rows] == [("tiny", "bf16", "fits"), ("tiny", "nf4", "fits")]
    assert all(r["peak_gib"] > 0 and r["step_s"] > 0 and r["trainable"] > 0 and r["checkpointing"] for r in rows)
    text = out.read_text()
    assert "Largest that fits at density 0.01: bf16 base: **tiny**" in text and "nf4 base: **tiny**" in text


def test_nf4_try_without_torchao_is_recorded_as_skipped_with_the_reason(monkeypatch):
    from sparseft.bench import gpu_fit

    monkeypatch.setattr(gpu_fit, "nf4_missing", lambda: "nf4 needs torchao, which failed here: ImportError")
    args = gpu_fit.parse_args(["--device", "cpu", "--tiny"])
    result = gpu_fit.probe(args, "tiny", "nf4", 0.01)
    assert (result.status, result.note) == ("skipped", "nf4 needs torchao, which failed here: ImportError")
    assert result.peak_gib is None
