"""A sparse diff over a weight-only quantized base (torchao int8 / int4): it trains, and the saved diff
reloads onto the same quantized base with the same outputs, and onto no other base."""

import pytest
import torch

pytest.importorskip("torchao")

from conftest import make_tiny_llama, make_tiny_tokenizer  # noqa: E402
from sparseft import SparseModel  # noqa: E402
from sparseft.diffio import read_diff  # noqa: E402
from sparseft.errors import ConfigError, FingerprintMismatchError, MergeStateError  # noqa: E402
from sparseft.quantize import quantize_base  # noqa: E402
from sparseft.training import run_training  # noqa: E402
from test_training import quick_config, write_train_file  # noqa: E402

KINDS = {"int8": "Int8Tensor", "int4": "IntxUnpackedToInt8Tensor"}  # torchao's weight classes


@pytest.fixture
def train_file(tmp_path):
    return write_train_file(tmp_path / "train.jsonl")


def outputs(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_diff_over_a_quantized_base_trains_and_reloads_onto_it(scheme, train_file, tmp_path):
    trained = make_tiny_llama()
    result = run_training(quick_config(train_file, tmp_path / "run", steps=8, quantize=scheme), model=trained,
                          tokenizer=make_tiny_tokenizer())
    assert result.losses[-1] < result.losses[0]
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    q_proj = trained.model.layers[0].self_attn.q_proj
    assert q_proj.forward_mode == "unmerged" and type(q_proj.weight).__name__ == KINDS[scheme]

    diff = read_diff(tmp_path / "run")
    assert list(diff.base_fingerprint) == [KINDS[scheme]]  # the base as trained over: quantized, not fp32
    reloaded = SparseModel.from_pretrained(quantize_base(make_tiny_llama(), scheme), tmp_path / "run")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    assert torch.equal(outputs(reloaded, ids), outputs(trained, ids))
    assert not torch.equal(outputs(quantize_base(make_tiny_llama(), scheme), ids), outputs(trained, ids))


def test_a_diff_over_a_quantized_base_refuses_other_bases(train_file, tmp_path):
    run_training(quick_config(train_file, tmp_path / "run", steps=2, quantize="int8"), model=make_tiny_llama(),
                 tokenizer=make_tiny_tokenizer())
    with pytest.raises(FingerprintMismatchError, match=r"\['Int8Tensor'\] weights, but the model's weights are float32"):
        SparseModel.from_pretrained(make_tiny_llama(), tmp_path / "run")
    with pytest.raises(FingerprintMismatchError, match="IntxUnpackedToInt8Tensor"):
        SparseModel.from_pretrained(quantize_base(make_tiny_llama(), "int4"), tmp_path / "run")
    other = quantize_base(make_tiny_llama(seed=1), "int8")
    with pytest.raises(FingerprintMismatchError, match="made for a different base model"):
        SparseModel.from_pretrained(other, tmp_path / "run")
    assert type(other.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"  # not wrapped: left unchanged


@pytest.mark.parametrize("overrides, message", [
    (dict(quantize="int3"), r"quantize must be one of \['int4', 'int8'\], got 'int3'"),
    (dict(quantize="int8", method="lora"), "quantize applies to sparse runs only"),
    (dict(quantize="int8", fsdp=True), "quantize cannot be combined with fsdp"),
])
def test_bad_quantize_settings_are_refused(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        quick_config(tmp_path / "train.jsonl", tmp_path / "out", **overrides)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_backward_through_a_quantized_layer_saves_no_dense_weight(scheme):
    """Autograd through torchao's linear would keep a dequantized fp32 copy of every weight until
    backward; the quantized base recomputes it in backward instead, with the same grad_x."""
    layer = quantize_base(torch.nn.Sequential(torch.nn.Linear(64, 96)), scheme)[0]
    x = torch.randn(3, 64, requires_grad=True, generator=torch.Generator().manual_seed(0))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert not [t for t in saved if t.numel() >= layer.weight.numel()]
    y.pow(2).sum().backward()
    dense_x = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(dense_x, layer.weight.dequantize(), layer.bias).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, dense_x.grad, rtol=1e-5, atol=1e-5)
    assert not layer.weight.requires_grad


@pytest.mark.parametrize("merge", ["merge", "merge_and_unload"])
def test_merge_over_a_quantized_base_is_refused_up_front(merge, train_file, tmp_path):
    run_training(quick_config(train_file, tmp_path / "run", steps=2, quantize="int8"), model=make_tiny_llama(),
                 tokenizer=make_tiny_tokenizer())
    sparse = SparseModel.from_pretrained(quantize_base(make_tiny_llama(), "int8"), tmp_path / "run")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    before = outputs(sparse, ids)
    with pytest.raises(MergeStateError, match=r"cannot merge .*model\.layers\.0\.\S+: its weight is quantized "
                                              r"\(Int8Tensor\).*stays unmerged"):
        getattr(sparse, merge)()
    assert not sparse.merged and torch.equal(outputs(sparse, ids), before)  # nothing changed
