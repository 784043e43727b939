"""A diff trained over a quantized base, used where a full-precision one goes: ``apply --quantize`` merges it
into the dequantized base (a plain model, for export), and ``verify`` / ``audit`` take ``--quantize`` too,
so the advice a refusal gives ("load it with --quantize int8") can be followed with every verb."""

import json

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

from conftest import make_tiny_llama, make_tiny_tokenizer  # noqa: E402
from sparseft.cli import main  # noqa: E402
from sparseft.diffio import read_diff  # noqa: E402
from sparseft.quantize import dequantize_base, dequantized, quantize_base  # noqa: E402
from sparseft.training import run_training  # noqa: E402
from test_quantize import outputs  # noqa: E402
from test_training import quick_config, write_train_file  # noqa: E402

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def base_dir(tmp_path):
    """make_tiny_llama() as a model directory: the base every run below trained over (quantized)."""
    path = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(path)
    return path


def train_over(scheme: str, tmp_path):
    """3 steps of a sparse diff over make_tiny_llama() quantized with ``scheme``: (the model, unmerged, and the run dir)."""
    trained, run = make_tiny_llama(), tmp_path / f"run-{scheme}"
    cfg = quick_config(write_train_file(tmp_path / "train.jsonl"), run, steps=3, quantize=scheme)
    run_training(cfg, model=trained, tokenizer=make_tiny_tokenizer())
    return trained, run


def test_dequantize_base_gives_plain_linears_holding_what_the_codes_stand_for():
    model = quantize_base(make_tiny_llama(), "nf4")
    stored = model.model.layers[0].mlp.up_proj.weight
    dequantize_base(model)
    layer = model.model.layers[0].mlp.up_proj
    assert type(layer) is nn.Linear and type(layer.weight) is nn.Parameter and not layer.weight.requires_grad
    assert torch.equal(layer.weight, dequantized(stored))
    assert not any(type(p.data).__name__ == "NF4Tensor" for p in model.parameters())


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_apply_quantize_writes_a_plain_model_computing_what_the_unmerged_diff_did(scheme, base_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    trained, run = train_over(scheme, tmp_path)
    out = tmp_path / "merged"
    assert main(["apply", "--model", str(base_dir), "--diff", str(run), "--out", str(out), "--quantize", scheme]) == 0
    assert f"(its {scheme} base dequantized to float32)" in capsys.readouterr().out

    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no sparseft, no torchao
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.float32
    # The merged weight is dequantized(W) + Δ (fp32: the values added exactly as the unmerged forward adds them) ...
    diff, name = read_diff(run), "model.layers.0.self_attn.q_proj"
    expected = dequantized(quantize_base(make_tiny_llama(), scheme).get_submodule(name).weight).reshape(-1).clone()
    expected.index_add_(0, diff.masks[name].long(), diff.values[name].float())
    assert torch.equal(q_proj.weight.reshape(-1), expected)
    # ... so its logits are those of the diff unmerged over the codes, up to the order of float32 sums
    # (torchao's int8 linear scales after the matmul; the merged model's matmul also takes in Δ).
    torch.testing.assert_close(outputs(merged, IDS), outputs(trained, IDS), rtol=1e-5, atol=1e-5)
    without_diff = outputs(dequantize_base(quantize_base(make_tiny_llama(), scheme)), IDS)
    assert (outputs(merged, IDS) - without_diff).abs().max() > 1e-3  # the diff is in it


def test_apply_without_quantize_refuses_a_quantized_diff_naming_the_flag_and_writes_nothing(base_dir, tmp_path,
                                                                                             capsys):
    _, run = train_over("int8", tmp_path)
    out = tmp_path / "merged"
    assert main(["apply", "--model", str(base_dir), "--diff", str(run), "--out", str(out)]) == 2
    assert "load it with --dtype float32 --quantize int8" in capsys.readouterr().err
    assert not out.exists()
    # The other scheme: the codes differ, so the fingerprint refuses it, again before anything is written.
    assert main(["apply", "--model", str(base_dir), "--diff", str(run), "--out", str(out), "--quantize", "nf4"]) == 2
    assert "NF4Tensor" in capsys.readouterr().err and not out.exists()
