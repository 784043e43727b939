"""A diff trained over a quantized base, used where a full-precision one goes: ``apply --quantize`` merges it
into the dequantized base (a plain model, for export), and ``verify`` / ``audit`` take ``--quantize`` too,
so the advice a refusal gives ("load it with --quantize int8") can be followed with every verb."""

import json

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

from conftest import make_tiny_llama, make_tiny_tokenizer  # noqa: E402
from sparseft.audit.verify import CHECKS  # noqa: E402
from sparseft.cli import main  # noqa: E402
from sparseft.diffio import read_diff  # noqa: E402
from sparseft.quantize import dequantize_base, dequantized, quantize_base  # noqa: E402
from sparseft.training import run_training  # noqa: E402
from test_quantize import outputs  # noqa: E402
from test_training import quick_config, write_train_file  # noqa: E402

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """make_tiny_llama() as a model directory: the base every run below trained over (quantized)."""
    path = tmp_path_factory.mktemp("base") / "tiny"
    make_tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained_over(tmp_path_factory):
    """``trained_over(scheme, dtype)``: (the model, diff unmerged, and its run dir) of 3 steps over make_tiny_llama()
    in ``dtype`` quantized with ``scheme``; each trained once for the module (tests must not change the model)."""
    root, runs = tmp_path_factory.mktemp("runs"), {}

    def train(scheme: str, dtype: str = "float32"):
        if (scheme, dtype) not in runs:
            trained, run = make_tiny_llama().to(getattr(torch, dtype)), root / f"{scheme}-{dtype}"
            cfg = quick_config(write_train_file(root / "train.jsonl"), run, steps=3, quantize=scheme, dtype=dtype)
            run_training(cfg, model=trained, tokenizer=make_tiny_tokenizer())
            runs[scheme, dtype] = trained, run
        return runs[scheme, dtype]

    return train


def test_dequantize_base_gives_plain_linears_holding_what_the_codes_stand_for():
    model = quantize_base(make_tiny_llama(), "nf4")
    stored = model.model.layers[0].mlp.up_proj.weight
    dequantize_base(model)
    layer = model.model.layers[0].mlp.up_proj
    assert type(layer) is nn.Linear and type(layer.weight) is nn.Parameter and not layer.weight.requires_grad
    assert torch.equal(layer.weight, dequantized(stored))
    assert not any(type(p.data).__name__ == "NF4Tensor" for p in model.parameters())


# fp32: the merged model's matmul also takes in Δ, and torchao's int8 linear applies the row scales after its
# matmul, so only the order of float32 sums differs. bf16: each output rounds to bf16; 2 ulps at the tiny
# model's logits (|logit| < 0.5; measured: 2.9e-3 int8, 2.0e-3 nf4).
TOLERANCE = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=0, atol=2 ** -8)}


@pytest.mark.parametrize("scheme, dtype", [("int8", "float32"), ("nf4", "float32"), ("nf4", "bfloat16"),
                                           ("q4_1", "float32")])
def test_apply_quantize_writes_a_plain_model_computing_what_the_unmerged_diff_did(scheme, dtype, base_dir, trained_over,
                                                                                     tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    trained, run = trained_over(scheme, dtype)
    out = tmp_path / "merged"
    assert main(["apply", "--model", str(base_dir), "--diff", str(run), "--out", str(out), "--quantize", scheme,
                 "--dtype", dtype]) == 0
    assert f"(its {scheme} base dequantized to {dtype})" in capsys.readouterr().out

    merged = AutoModelForCausalLM.from_pretrained(out, dtype="auto")  # plain transformers, no sparseft, no torchao
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == getattr(torch, dtype)
    # The merged weight is dequantized(W) + Δ, Δ rounded once to the dtype ...
    diff, name = read_diff(run), "model.layers.0.self_attn.q_proj"
    base = quantize_base(make_tiny_llama().to(getattr(torch, dtype)), scheme)
    expected = dequantized(base.get_submodule(name).weight).reshape(-1).clone()
    expected.index_add_(0, diff.masks[name].long(), diff.values[name].to(expected.dtype))
    assert torch.equal(q_proj.weight.reshape(-1), expected)
    # ... so its logits are those of the diff unmerged over the codes, up to float rounding.
    torch.testing.assert_close(outputs(merged, IDS), outputs(trained, IDS), **TOLERANCE[dtype])
    without_diff = outputs(dequantize_base(base), IDS)
    assert (outputs(merged, IDS) - without_diff).abs().max() > 1e-3  # the diff is in it



def test_apply_without_quantize_refuses_a_quantized_diff_naming_the_flag_and_writes_nothing(base_dir, trained_over,
                                                                                             tmp_path, capsys):
    _, run = trained_over("int8")
    out = tmp_path / "merged"
    assert main(["apply", "--model", str(base_dir), "--diff", str(run), "--out", str(out)]) == 2
    assert "load it with --dtype float32 --quantize int8" in capsys.readouterr().err
    assert not out.exists()
    # The other scheme: the codes differ, so the fingerprint refuses it, again before anything is written.
    assert main(["apply", "--model", str(base_dir), "--diff", str(run), "--out", str(out), "--quantize", "nf4"]) == 2
    assert "NF4Tensor" in capsys.readouterr().err and not out.exists()


def test_verify_quantize_passes_over_the_base_the_diff_trained_over(base_dir, trained_over, capsys):
    _, run = trained_over("int8")
    assert main(["verify", "--model", str(base_dir), "--diff", str(run)]) == 1  # fp32: the refusal's advice ...
    assert "FAIL fingerprint:" in capsys.readouterr().out
    assert main(["verify", "--model", str(base_dir), "--diff", str(run), "--quantize", "int8"]) == 0  # ... followed
    assert capsys.readouterr().out.splitlines() == [f"PASS {name}" for name in CHECKS]
    assert main(["verify", "--diff", str(run), "--quantize", "int8"]) == 2  # nothing to quantize
    assert "--quantize quantizes the base model: give it with --model" in capsys.readouterr().err


def test_audit_quantize_runs_the_diff_unmerged_over_the_quantized_base(base_dir, trained_over, tmp_path, capsys):
    _, run = trained_over("int8")
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"id": "a", "prompt_ids": [5, 9, 2, 40]}) + "\n"
                      + json.dumps({"id": "b", "prompt_ids": [7, 3], "pair_ids": [7, 4], "target_ids": [11]}) + "\n")
    argv = ["audit", "--model", str(base_dir), "--diff", str(run), "--probe", str(probes), "--out", str(tmp_path / "a")]
    assert main(argv) == 2 and "--quantize int8" in capsys.readouterr().err  # the fp32 base: refused
    no_gates = ["--max-kl", "100", "--min-agreement", "0", "--max-pair-drift", "100"]  # this test is not about limits
    assert main([*argv, "--quantize", "int8", *no_gates]) == 0
    report = json.loads((tmp_path / "a" / "audit.json").read_text())
    # The diff loaded (its fingerprint is the int8 base's) and moved the outputs although it was never merged
    # (3 prompts: the pair counts both of its own).
    assert report["summary"]["num_prompts"] == 3 and report["summary"]["kl_mean"] > 0
