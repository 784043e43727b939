"""A sparse diff over a weight-only quantized base (torchao int8 / int4 / nf4): it trains, and the saved diff
reloads onto the same quantized base with the same outputs, and onto no other base."""

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("torchao")

from conftest import make_tiny_llama, make_tiny_tokenizer  # noqa: E402
from sparseft import SparseConfig, SparseModel, get_sparse_model, select  # noqa: E402
from sparseft import evaluate as evaluate_module  # noqa: E402
from sparseft.cli import main  # noqa: E402
from sparseft.base_match import fingerprint, stored_tensors  # noqa: E402
from sparseft.diffio import read_diff  # noqa: E402
from sparseft.errors import ConfigError, FingerprintMismatchError, MergeStateError  # noqa: E402
from sparseft.evaluate import evaluate  # noqa: E402
from sparseft.loading import load_model  # noqa: E402
from sparseft.methods import get_method  # noqa: E402
from sparseft.quantize import (NF4_BLOCK, QuantizedLinear, dequantized, is_quantized, linear_layers,  # noqa: E402
                               quantize_base, quantize_sparse_model, skip_patterns, to_nf4_weight)
from sparseft.sparse_linear import SparseLinear  # noqa: E402
from sparseft.tasks import ROUTING_DATA  # noqa: E402
from sparseft.training import run_training  # noqa: E402
from test_evaluate import model_dir  # noqa: E402,F401 - fixture: the tiny model saved with a tokenizer
from test_tasks import char_tokenizer  # noqa: E402
from test_training import quick_config, write_train_file  # noqa: E402

# The weight classes: torchao's, and GGUF's Q4_1 blocks (sparseft.blockquant)
KINDS = {"int8": "Int8Tensor", "int4": "IntxUnpackedToInt8Tensor", "nf4": "NF4Tensor", "q4_1": "Q4_1Tensor"}
SCHEMES = list(KINDS)


@pytest.fixture
def train_file(tmp_path):
    return write_train_file(tmp_path / "train.jsonl")


def outputs(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("scheme", SCHEMES)
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


@pytest.mark.parametrize("scheme,stored_as", [("int8", "Int8Tensor"), ("nf4", "NF4Tensor")])
def test_a_diff_over_a_quantized_base_refuses_other_bases(train_file, tmp_path, scheme, stored_as):
    run_training(quick_config(train_file, tmp_path / "run", steps=2, quantize=scheme), model=make_tiny_llama(),
                 tokenizer=make_tiny_tokenizer())
    with pytest.raises(FingerprintMismatchError, match=rf"\['{stored_as}'\] weights, but the model's weights are float32"):
        SparseModel.from_pretrained(make_tiny_llama(), tmp_path / "run")
    with pytest.raises(FingerprintMismatchError, match="IntxUnpackedToInt8Tensor"):
        SparseModel.from_pretrained(quantize_base(make_tiny_llama(), "int4"), tmp_path / "run")
    other = quantize_base(make_tiny_llama(seed=1), scheme)
    with pytest.raises(FingerprintMismatchError, match="made for a different base model"):
        SparseModel.from_pretrained(other, tmp_path / "run")
    assert type(other.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"  # not wrapped: left unchanged


@pytest.mark.parametrize("overrides, message", [
    (dict(quantize="int3"), r"quantize must be one of \['int4', 'int8', 'nf4', 'q4_1'\], got 'int3'"),
    (dict(quantize="int8", method="lora"), "quantize applies to sparse runs only"),
    (dict(quantize="int8", fsdp=True), "quantize cannot be combined with fsdp"),
    (dict(quantize="nf4", quantize_init="lofi"),
     r"quantize_init must be one of \['correction', 'correction-after', 'zero'\], got 'lofi'"),
    (dict(quantize="nf4", quantize_init="correction-after", reselect_every=2), "the entries move"),
    (dict(quantize="nf4", quantize_init="correction-after", select_over="quantized"), "needs the full-precision"),
    # Without quantize it has nothing to act on: refused, as bench refuses it on a row without quantize.
    (dict(method="lora", quantize_init="correction-after"),
     r"quantize_init='correction-after' says where .* it needs quantize \(--quantize int8\|int4\|nf4\|q4_1\)"),
])
def test_bad_quantize_settings_are_refused(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        quick_config(tmp_path / "train.jsonl", tmp_path / "out", **overrides)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_correction_init_starts_the_selected_entries_at_their_full_precision_weights(scheme, dtype):
    """dequantized(W) + value == W at every selected entry (up to one fp32 rounding of the sum), and
    init="zero" leaves the values at 0."""
    config = SparseConfig(density=0.05, scorer="random", seed=0)
    original = {name: m.weight.detach().clone() for name, m in linear_layers(make_tiny_llama(dtype=dtype)).items()}
    corrected = quantize_sparse_model(get_sparse_model(make_tiny_llama(dtype=dtype), config), scheme, init="correction")
    zero = quantize_sparse_model(get_sparse_model(make_tiny_llama(dtype=dtype), config), scheme)  # the default
    for name, layer in corrected.sparse_layers().items():
        assert is_quantized(layer.weight)
        rounded = dequantized(layer.weight).reshape(-1)[layer.indices].float()
        wanted = original[name].reshape(-1)[layer.indices].float()
        assert not torch.equal(rounded, wanted)  # quantization moved these entries ...
        torch.testing.assert_close(rounded + layer.values.detach(), wanted, rtol=0, atol=1e-6)  # ... the values undo it
        assert layer.values.requires_grad
        assert torch.count_nonzero(zero.get_submodule(name).values) == 0


def test_a_run_over_a_quantized_base_records_where_its_values_started(train_file, tmp_path):
    run_training(quick_config(train_file, tmp_path / "a", steps=1, quantize="int8"), model=make_tiny_llama(),
                 tokenizer=make_tiny_tokenizer())
    run_training(quick_config(train_file, tmp_path / "b", steps=1, quantize="int8", quantize_init="correction"),
                 model=make_tiny_llama(), tokenizer=make_tiny_tokenizer())
    inits = [read_diff(tmp_path / run).provenance["train_config"]["quantize_init"] for run in ("a", "b")]
    assert inits == ["zero", "correction"]


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_correction_after_saves_the_trained_values_plus_each_entrys_quantization_error(train_file, tmp_path, scheme):
    """The same run trained from zero, its entries' error W − dequantized(Q(W)) added once at the end: the
    training itself (selection, steps, losses) is the zero run's."""
    runs = {}
    for init in ("zero", "correction-after"):
        runs[init] = run_training(quick_config(train_file, tmp_path / init, steps=3, quantize=scheme, quantize_init=init),
                                  model=make_tiny_llama(), tokenizer=make_tiny_tokenizer())
    assert runs["zero"].losses == runs["correction-after"].losses
    zero, after = read_diff(tmp_path / "zero"), read_diff(tmp_path / "correction-after")
    assert after.provenance["train_config"]["quantize_init"] == "correction-after"
    original = {name: m.weight.detach().float() for name, m in linear_layers(make_tiny_llama()).items()}
    rounded = {name: dequantized(m.weight).float() for name, m in quantize_base(make_tiny_llama(), scheme).named_modules()
               if name in original}
    for name, indices in after.masks.items():
        assert torch.equal(indices, zero.masks[name])
        error = (original[name] - rounded[name]).reshape(-1)[indices.long()]
        assert torch.count_nonzero(error)  # the base's rounding moved these entries ...
        torch.testing.assert_close(after.values[name].float(), zero.values[name].float() + error, rtol=0, atol=1e-6)
    reloaded = SparseModel.from_pretrained(quantize_base(make_tiny_llama(), scheme), tmp_path / "correction-after")
    for name, layer in reloaded.sparse_layers().items():  # ... and the diff puts them back, plus what training added
        weight = dequantized(layer.weight).reshape(-1)[layer.indices].float() + layer.values.detach().float()
        wanted = original[name].reshape(-1)[layer.indices] + zero.values[name].float()
        torch.testing.assert_close(weight, wanted, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
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
    torch.nn.functional.linear(dense_x, dequantized(layer.weight), layer.bias).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, dense_x.grad, rtol=1e-5, atol=1e-5)
    assert not layer.weight.requires_grad


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_diff_learns_over_a_quantized_base_as_over_its_dequantized_weights(scheme, dtype):
    """Loss and the values' gradients through the quantized base match those through plain weights
    holding what its codes stand for (same entries, same values); torchao's int8 kernel rounds
    differently in bf16, hence a bf16 tolerance."""
    config = SparseConfig(density=0.1, scorer="random", seed=0)
    quantized = quantize_sparse_model(get_sparse_model(make_tiny_llama(dtype=dtype), config), scheme)
    dense = get_sparse_model(make_tiny_llama(dtype=dtype), config)
    with torch.no_grad():  # every quantized weight: the linear layers, and q4_1's Q8_0 embedding
        for name, weight in quantized.named_parameters():
            if is_quantized(weight):
                dense.get_parameter(name).copy_(dequantized(weight))
    for layer in dense.sparse_layers().values():
        layer.set_kernels(layer.backend, "unmerged")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    results = []
    for model in (quantized, dense):
        for layer in model.sparse_layers().values():
            with torch.no_grad():
                layer.values.copy_(torch.randn(layer.k, generator=torch.Generator().manual_seed(layer.k)) * 0.01)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss, {name: layer.values.grad for name, layer in model.sparse_layers().items()}))
    (q_loss, q_grads), (d_loss, d_grads) = results
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(q_loss, d_loss, rtol=rtol, atol=0)
    assert q_grads.keys() == d_grads.keys()
    for name in q_grads:
        torch.testing.assert_close(q_grads[name], d_grads[name], rtol=rtol, atol=rtol * d_grads[name].abs().max().item())


@pytest.mark.parametrize("scheme, merge", [("int8", "merge"), ("int8", "merge_and_unload"), ("nf4", "merge"),
                                           ("q4_1", "merge")])
def test_merge_over_a_quantized_base_is_refused_up_front(scheme, merge, train_file, tmp_path):
    run_training(quick_config(train_file, tmp_path / "run", steps=2, quantize=scheme), model=make_tiny_llama(),
                 tokenizer=make_tiny_tokenizer())
    sparse = SparseModel.from_pretrained(quantize_base(make_tiny_llama(), scheme), tmp_path / "run")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    before = outputs(sparse, ids)
    with pytest.raises(MergeStateError, match=rf"cannot merge .*model\.layers\.0\.\S+: its weight is quantized "
                                              rf"\({KINDS[scheme]}\).*stays unmerged"):
        getattr(sparse, merge)()
    assert not sparse.merged and torch.equal(outputs(sparse, ids), before)  # nothing changed


# ---------------------------------------------------------------- nf4: two 4-bit codes per byte


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes of a packed uint8 tensor, in weight order (high nibble first)."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).flatten()


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    return (codes[0::2] << 4 | codes[1::2]).to(torch.uint8)


def quantized_layers(model) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def test_nf4_packs_two_codes_per_byte_that_unpack_exactly():
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    q = to_nf4_weight(weight)
    assert q.quantized_data.dtype == torch.uint8 and q.quantized_data.numel() == weight.numel() // 2
    codes = unpack_codes(q.quantized_data)
    assert torch.equal(pack_codes(codes), q.quantized_data)
    # Each code is the nearest of the 16 NF4 levels to the weight over its block's absmax (computed here).
    blocks = weight.reshape(-1, NF4_BLOCK)
    scaled = (blocks / blocks.abs().amax(dim=1, keepdim=True)).reshape(-1, 1)
    assert torch.equal(codes.long(), (scaled - q.nf4).abs().argmin(dim=1))
    # The dense weight the layer computes with: each code's level times one scale per block, close to its absmax.
    levels = q.nf4[codes.long()].reshape(-1, NF4_BLOCK)
    dense = dequantized(q).reshape(-1, NF4_BLOCK)
    scales = dense.abs().amax(dim=1) / levels.abs().amax(dim=1)
    torch.testing.assert_close(dense, levels * scales[:, None])
    torch.testing.assert_close(scales, blocks.abs().amax(dim=1), rtol=0.02, atol=0)


def test_nf4_quantization_is_deterministic():
    first, again, other = (quantized_layers(quantize_base(make_tiny_llama(seed=s), "nf4")) for s in (0, 0, 1))
    assert len(first) == 2 * 7 + 1  # every linear layer: 7 per decoder layer and the untied head
    prints = [fingerprint({n: m.weight for n, m in layers.items()}) for layers in (first, again, other)]
    assert prints[0] == prints[1] != prints[2]
    for name, layer in first.items():
        assert all(torch.equal(a, b) for a, b in zip(stored_tensors(layer.weight), stored_tensors(again[name].weight)))


def test_an_nf4_base_stores_under_0_3_of_the_fp32_bytes_of_each_linear_weight():
    model = make_tiny_llama()
    shapes = {name: layer.weight.shape for name, layer in linear_layers(model).items()}
    fp32_bytes = {name: layer.weight.numel() * 4 for name, layer in linear_layers(model).items()}
    quantize_base(model, "nf4")
    assert quantized_layers(model).keys() == shapes.keys()
    for name, layer in quantized_layers(model).items():
        assert type(layer.weight).__name__ == "NF4Tensor" and layer.weight.shape == shapes[name]  # the logical shape
        stored = sum(t.numel() * t.element_size() for t in stored_tensors(layer.weight))
        assert stored < 0.3 * fp32_bytes[name], name


def test_nf4_refuses_a_layer_it_cannot_block_and_leaves_the_model_as_it_was():
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 5))  # 480 weights: not 64-divisible
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=r"quantize='nf4': 1 has \(5, 96\) weights, 480 in all, not a multiple "
                                          r"of the NF4 block of 64"):
        quantize_base(model, "nf4")
    assert all(type(m) is torch.nn.Linear for m in model)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_nf4_over_a_bfloat16_base_trains_reloads_and_evaluates_the_same(train_file, tmp_path):
    """``--dtype bfloat16 --quantize nf4``: embeddings and norms bf16, linear weights NF4; the diff
    reloads onto that base loaded the way evaluation loads it, with equal logits and metrics."""
    base_dir = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(base_dir)
    trained = load_model(str(base_dir), dtype="bfloat16")
    cfg = quick_config(train_file, tmp_path / "run", steps=6, quantize="nf4", dtype="bfloat16")
    result = run_training(cfg, model=trained, tokenizer=make_tiny_tokenizer())
    assert result.losses[-1] < result.losses[0]
    assert trained.get_input_embeddings().weight.dtype == torch.bfloat16
    q_proj = trained.model.layers[0].self_attn.q_proj
    assert type(q_proj.weight).__name__ == "NF4Tensor" and q_proj.weight.dtype == torch.bfloat16

    reloaded = get_method("sparse").load_for_eval(str(base_dir), str(tmp_path / "run"), dtype="bfloat16",
                                                  quantize="nf4")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    assert torch.equal(outputs(reloaded, ids), outputs(trained, ids))
    test_file = str(ROUTING_DATA / "test.jsonl")
    scores = [evaluate(m, char_tokenizer(chat=True), "routing", test_file, limit=4, progress=False)[0]
              for m in (reloaded, trained)]
    assert scores[0] == scores[1]



def record_scored_models(monkeypatch) -> list:
    """The models ``sparseft eval`` scores, in order (it still scores them)."""
    scored = []
    real = evaluate_module.evaluate_records
    monkeypatch.setattr(evaluate_module, "evaluate_records",
                        lambda model, *a, **k: scored.append(model) or real(model, *a, **k))
    return scored


def eval_argv(base_dir, diff) -> list[str]:
    return ["eval", "--model", str(base_dir), "--diff", str(diff), "--task", "routing",
            "--data", str(ROUTING_DATA / "test.jsonl"), "--limit", "4"]


def test_eval_quantize_scores_the_diff_unmerged_over_the_base_it_trained_over(model_dir, train_file, tmp_path,
                                                                               capsys, monkeypatch):
    trained = make_tiny_llama()
    run_training(quick_config(train_file, tmp_path / "run", steps=4, quantize="int8"), model=trained,
                 tokenizer=make_tiny_tokenizer())
    scored = record_scored_models(monkeypatch)

    assert main([*eval_argv(model_dir, tmp_path / "run"), "--quantize", "int8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adapter"] == "sparse" and report["extra"]["quantize"] == "int8"
    q_proj = scored[0].model.layers[0].self_attn.q_proj
    assert type(q_proj.weight).__name__ == "Int8Tensor" and q_proj.forward_mode == "unmerged"
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    assert torch.equal(outputs(scored[0], ids), outputs(trained, ids))

    assert main(eval_argv(model_dir, tmp_path / "run")) == 2  # the fp32 base: refused, naming the flag that fixes it
    assert "weights are float32; the diff was trained over a base with float32 non-quantized weights and int8 " \
           "linear weights; load it with --dtype float32 --quantize int8" in capsys.readouterr().err


def test_eval_quantize_refuses_a_lora_adapter_before_loading_the_model(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    assert main([*eval_argv(tmp_path / "no-such-model", tmp_path / "lora"), "--quantize", "nf4"]) == 2
    assert "quantize='nf4' (--quantize) applies to the base alone or a sparse diff trained over that quantized " \
           "base, not a lora adapter" in capsys.readouterr().err


def test_a_bf16_nf4_diff_on_an_fp32_nf4_base_is_refused_naming_what_differs(train_file, tmp_path):
    base_dir = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(base_dir)
    cfg = quick_config(train_file, tmp_path / "run", steps=2, quantize="nf4", dtype="bfloat16")
    run_training(cfg, model=load_model(str(base_dir), dtype="bfloat16"), tokenizer=make_tiny_tokenizer())
    fp32_nf4 = quantize_base(load_model(str(base_dir)), "nf4")
    with pytest.raises(FingerprintMismatchError, match=(
            "the diff was trained over a base with bfloat16 non-quantized weights and nf4 linear weights; this base "
            "has float32 non-quantized weights and nf4 linear weights; load it with --dtype bfloat16 --quantize nf4")):
        SparseModel.from_pretrained(fp32_nf4, tmp_path / "run")

    # A diff that records no training config cannot say its dtype: the refusal says to check it.
    config_path = tmp_path / "run" / "sparse_config.json"
    meta = json.loads(config_path.read_text())
    del meta["provenance"]["train_config"]
    config_path.write_text(json.dumps(meta))
    with pytest.raises(FingerprintMismatchError, match="made for a different base model .*; if it is that model, it "
                                                       "must also be loaded in the --dtype it was quantized from"):
        SparseModel.from_pretrained(fp32_nf4, tmp_path / "run")


def test_quant_correction_scores_a_diff_as_trained_and_with_its_entries_back_at_full_precision(
        model_dir, train_file, tmp_path, capsys):
    from sparseft.bench import quant_correction

    model = load_model(model_dir)
    run_training(quick_config(train_file, tmp_path / "run", steps=2, quantize="nf4", quantize_init="zero"),
                 model=load_model(model_dir), tokenizer=make_tiny_tokenizer())
    diff = read_diff(tmp_path / "run")
    originals, rounded = quant_correction.rounded_weights(model, "nf4")
    for add_error, wanted in ((False, rounded), (True, originals)):
        quant_correction.set_weights(model, rounded, originals, diff, add_error)
        for name, module in linear_layers(model).items():
            weight = module.weight.detach().reshape(-1)
            if name not in diff.masks:  # not a target (the tiny model's untied head): the rounded weight
                assert torch.equal(weight, rounded[name].reshape(-1))
                continue
            indices = diff.masks[name]
            torch.testing.assert_close(weight[indices], wanted[name].reshape(-1)[indices] + diff.values[name].float())

    argv = ["--model", str(model_dir), "--task", "routing", "--data", str(ROUTING_DATA / "test.jsonl"), "--limit", "8"]
    assert quant_correction.main([str(tmp_path / "run"), "--quantize", "nf4", *argv]) == 0
    assert "| run | " in capsys.readouterr().out
    assert quant_correction.main([str(tmp_path / "run"), str(tmp_path / "run"), "--quantize", "nf4", *argv]) == 0
    assert "| mean of 2 | " in capsys.readouterr().out
    assert quant_correction.main([str(tmp_path / "run"), "--quantize", "int8", *argv]) == 2  # not its base
    assert "trained over nf4 base in float32, not int8 in float32" in capsys.readouterr().err

    # Trained from the error, compared as trained with the diff trained from zero (paired by position).
    run_training(quick_config(train_file, tmp_path / "corr", steps=2, quantize="nf4", quantize_init="correction"),
                 model=load_model(model_dir), tokenizer=make_tiny_tokenizer())
    zero, corr = str(tmp_path / "run"), str(tmp_path / "corr")
    assert quant_correction.main([zero, "--trained-from-error", corr, "--quantize", "nf4", *argv]) == 0
    out = capsys.readouterr().out
    assert "| diff | as trained | trained from its entries' error |" in out and "| run / corr | " in out
    assert quant_correction.main([zero, zero, "--trained-from-error", corr, "--quantize", "nf4", *argv]) == 2
    assert "names 1 diffs for 2 positional ones" in capsys.readouterr().err
    assert quant_correction.main([corr, "--trained-from-error", zero, "--quantize", "nf4", *argv]) == 2
    assert "its values started as quantize_init='correction'; expected 'zero'" in capsys.readouterr().err
    assert quant_correction.main([zero, "--versus", zero, "--quantize", "nf4", *argv]) == 0
    assert "| diff | as trained | the --versus diff as trained |" in capsys.readouterr().out
    assert quant_correction.main([zero, "--versus", corr, "--quantize", "nf4", *argv]) == 2  # from zero only


def plain_copy_of(quantized_model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The tiny model again with every quantized linear weight replaced by its dequantized values."""
    plain = make_tiny_llama(dtype=dtype)
    rounded = {name: dequantized(m.weight) for name, m in quantized_model.named_modules()
               if isinstance(m, QuantizedLinear)}
    assert rounded
    with torch.no_grad():
        for name, module in linear_layers(plain).items():
            if name in rounded:
                module.weight.copy_(rounded[name])
    return plain


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_gradient_statistics_over_a_quantized_base_are_those_of_its_dequantized_weights(scheme):
    """A quantized weight has no gradient: Σg and Σg² come from grad_outᵀ·x at the layer, and must equal
    what autograd gives a plain model holding the dequantized weights; selection then picks the same entries."""
    from sparseft.selection.gradstats import accumulate_gradients
    from sparseft.targets import find_targets
    from test_selection import llama_batches

    quantized = quantize_base(make_tiny_llama(), scheme)
    plain = plain_copy_of(quantized, torch.float32)
    batches = llama_batches()
    names = ["q_proj", "down_proj"]
    flags = [p.requires_grad for p in quantized.parameters()]
    got = accumulate_gradients(quantized, find_targets(quantized, names), batches, ("grad_sum", "grad_sq_sum"))
    want = accumulate_gradients(plain, find_targets(plain, names), batches, ("grad_sum", "grad_sq_sum"))
    assert got.keys() == want.keys()
    for name in want:
        for stat in ("grad_sum", "grad_sq_sum"):
            torch.testing.assert_close(got[name][stat].value(), want[name][stat].value(), rtol=1e-4, atol=1e-7)
    assert [p.requires_grad for p in quantized.parameters()] == flags  # measuring left nothing behind
    assert all(p.grad is None for p in quantized.parameters())
    for scorer in ("combined", "fisher", "magnitude", "taylor"):
        cfg = SparseConfig(density=0.05, scorer=scorer, calibration_batches=len(batches))
        over_codes, over_plain = select(quantized, cfg, batches), select(plain, cfg, batches)
        overlap = sum(len(set(over_codes[n].tolist()) & set(over_plain[n].tolist())) for n in over_plain)
        assert overlap >= 0.99 * sum(m.numel() for m in over_plain.values()), scorer  # near-ties may swap


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_a_run_can_choose_its_entries_over_the_quantized_base(train_file, tmp_path, scheme):
    """select_over="quantized": the base is quantized before selection, the entries are those ``select``
    chooses over the codes, the diff loads onto that quantized base and trains its values."""
    from sparseft.methods.sparse import select_masks
    from sparseft.training.data import load_examples

    cfg = quick_config(train_file, tmp_path / "run", steps=2, quantize=scheme, select_over="quantized",
                       scorer="fisher", calibration_batches=2)
    result = run_training(cfg, model=make_tiny_llama(), tokenizer=make_tiny_tokenizer())
    diff = read_diff(tmp_path / "run")
    assert diff.provenance["train_config"]["select_over"] == "quantized"
    tokenizer = make_tiny_tokenizer()
    examples = load_examples(cfg.data, tokenizer, cfg.max_length, cfg.truncation)
    expected = select_masks(quantize_base(make_tiny_llama(), scheme), cfg.sparse_config(), examples,
                            tokenizer.pad_token_id, cfg.batch_size)
    assert diff.masks.keys() == expected.keys() and all(torch.equal(diff.masks[n], expected[n]) for n in expected)
    # Not the entries chosen over the full-precision weights (the same run, select_over="full").
    full = run_training(quick_config(train_file, tmp_path / "full", steps=2, quantize=scheme, scorer="fisher",
                                     calibration_batches=2), model=make_tiny_llama(), tokenizer=make_tiny_tokenizer())
    assert any(not torch.equal(read_diff(tmp_path / "full").masks[n], diff.masks[n]) for n in expected)
    sparse = SparseModel.from_pretrained(quantize_base(make_tiny_llama(), scheme), tmp_path / "run")  # fingerprint
    assert any(bool(layer.values.detach().abs().sum() > 0) for layer in sparse.sparse_layers().values())
    assert result.losses and full.losses


def test_selection_over_the_quantized_base_refuses_the_correction_start(train_file, tmp_path):
    with pytest.raises(ConfigError, match="quantize_init='correction' needs the full-precision weights"):
        quick_config(train_file, tmp_path / "run", quantize="int8", select_over="quantized", quantize_init="correction")
    with pytest.raises(ConfigError, match=r"select_over must be one of \['full', 'quantized'\], got 'codes'"):
        quick_config(train_file, tmp_path / "run", quantize="int8", select_over="codes")
    with pytest.raises(ConfigError, match="select_over='quantized' .* needs quantize"):
        quick_config(train_file, tmp_path / "run", select_over="quantized")


# ---------------------------------------------------------------- a mixed base (quantize_skip)


def test_quantize_skip_leaves_the_matching_layers_in_their_dtype_and_refuses_a_pattern_that_matches_none():
    model = make_tiny_llama()
    plain = {name: m.weight.detach().clone() for name, m in linear_layers(model).items()}
    quantize_base(model, "nf4", skip=["*.down_proj", "model.layers.0.*"])
    for name, module in linear_layers(make_tiny_llama()).items():
        stored = model.get_submodule(name).weight
        left = name.endswith(".down_proj") or name.startswith("model.layers.0.")
        assert is_quantized(stored) is not left, name
        if left:
            assert type(model.get_submodule(name)) is torch.nn.Linear and torch.equal(stored, plain[name])

    untouched = make_tiny_llama()
    with pytest.raises(ConfigError, match=r"quantize_skip pattern '\*\.down' matches no linear layer"):
        quantize_base(untouched, "nf4", skip=["*.down_proj", "*.down"])
    assert not any(is_quantized(m.weight) for m in linear_layers(untouched).values())  # refused before any layer


def test_a_diff_over_a_mixed_base_reloads_only_onto_that_mixed_base(train_file, tmp_path):
    trained = make_tiny_llama()
    skip = ["model.layers.0.*", "*.down_proj"]  # the first targeted weight is a plain one
    cfg = quick_config(train_file, tmp_path / "run", steps=6, quantize="nf4", quantize_skip="model.layers.0.*, *.down_proj")
    assert cfg.quantize_skip == skip  # the CLI's comma-separated form
    result = run_training(cfg, model=trained, tokenizer=make_tiny_tokenizer())
    assert result.losses[-1] < result.losses[0]
    layer = trained.model.layers[1]
    assert not is_quantized(layer.mlp.down_proj.weight) and is_quantized(layer.mlp.up_proj.weight)
    assert not is_quantized(trained.model.layers[0].self_attn.q_proj.weight)

    diff = read_diff(tmp_path / "run")
    assert list(diff.base_fingerprint) == ["NF4Tensor"]  # keyed by its quantized weights, not the first one's dtype
    assert diff.provenance["train_config"]["quantize_skip"] == skip
    reloaded = SparseModel.from_pretrained(quantize_base(make_tiny_llama(), "nf4", skip=skip), tmp_path / "run")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    assert torch.equal(outputs(reloaded, ids), outputs(trained, ids))
    advice = r"quantize_base\(model, 'nf4', skip=\['model\.layers\.0\.\*', '\*\.down_proj'\]\)"
    for other in (quantize_base(make_tiny_llama(), "nf4"), quantize_base(make_tiny_llama(), "nf4", skip=skip[:1])):
        with pytest.raises(FingerprintMismatchError, match=r"different base model .*left the layers .* unquantized: "
                                                           r"load the base with --quantize nf4 in the same command "
                                                           r"as this diff, .*serve --quantize-skip 'model\.layers"
                                                           r"\.0\.\*,\*\.down_proj'; in Python: " + advice):
            SparseModel.from_pretrained(other, tmp_path / "run")
    with pytest.raises(FingerprintMismatchError, match=r"but for the layers .*, left unquantized; .*" + advice):
        SparseModel.from_pretrained(make_tiny_llama(), tmp_path / "run")


def test_commands_given_a_mixed_base_diff_and_quantize_rebuild_the_base_it_records(model_dir, train_file, tmp_path,
                                                                                     capsys, monkeypatch):
    from sparseft.serve import build_app

    trained = make_tiny_llama()  # the weights model_dir holds
    run_training(quick_config(train_file, tmp_path / "run", steps=4, quantize="nf4", quantize_skip=["*.down_proj"]),
                 model=trained, tokenizer=make_tiny_tokenizer())
    run = str(tmp_path / "run")
    scored = record_scored_models(monkeypatch)
    assert main([*eval_argv(model_dir, run), "--quantize", "nf4"]) == 0
    layer = scored[0].model.layers[1]
    assert not is_quantized(layer.mlp.down_proj.weight) and is_quantized(layer.mlp.up_proj.weight)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    assert torch.equal(outputs(scored[0], ids), outputs(trained, ids))

    base = ["--model", str(model_dir), "--quantize", "nf4"]
    assert main(["verify", "--diff", run, *base]) == 0
    assert main(["diff-stats", run, run, *base]) == 0
    assert main(["apply", "--diff", run, "--out", str(tmp_path / "merged"), *base]) == 0
    assert main(["compose", run, run, "--weights", "0.5,0.5", "--out", str(tmp_path / "sum"), *base]) == 0
    assert main([*eval_argv(model_dir, tmp_path / "sum"), "--quantize", "nf4"]) == 0  # it records its inputs' base
    app = build_app(str(model_dir), [("mixed", run)], quantize="nf4")  # the diff registers: its fingerprint matched
    served = app.state.serve.engine.model.model.layers[1].mlp
    assert not is_quantized(served.down_proj.weight) and is_quantized(served.up_proj.weight)
    given = build_app(str(model_dir), quantize="nf4", quantize_skip="*.down_proj, *.up_proj")  # a comma-separated flag
    layer = given.state.serve.engine.model.model.layers[1].mlp
    assert not is_quantized(layer.down_proj.weight) and not is_quantized(layer.up_proj.weight)
    assert is_quantized(layer.gate_proj.weight)
    import sparseft.cli.serve as serve_cli

    engines = []  # Ray's replicas load no diff before their base: the verb hands them the recorded skip
    monkeypatch.setattr(serve_cli, "run_on_ray", lambda args, limits, engine: engines.append(engine) or 0)
    assert main(["serve", *base, "--ray", "--diff", f"mixed={run}"]) == 0
    assert engines[0].quantize_skip == ("*.down_proj",)
    capsys.readouterr()

    run_training(quick_config(train_file, tmp_path / "all", steps=2, quantize="nf4"), model=make_tiny_llama(),
                 tokenizer=make_tiny_tokenizer())
    assert main(["diff-stats", run, str(tmp_path / "all"), *base]) == 2  # one base cannot serve both
    assert (f"the diffs were trained over different nf4 bases (layers left unquantized: {run}: ['*.down_proj']; "
            f"{tmp_path / 'all'}: none); one base serves them all") in capsys.readouterr().err


@pytest.mark.parametrize("init, select_over", [("correction", "full"), ("zero", "quantized")])
def test_a_mixed_base_run_corrects_and_selects_over_its_quantized_layers_only(train_file, tmp_path, init, select_over):
    trained = make_tiny_llama()
    cfg = quick_config(train_file, tmp_path / "run", steps=2, lr=1e-12, quantize="nf4", quantize_skip=["*.down_proj"],
                       quantize_init=init, select_over=select_over)
    run_training(cfg, model=trained, tokenizer=make_tiny_tokenizer())
    layers = {name: m for name, m in trained.named_modules() if isinstance(m, SparseLinear)}
    plain = [layer for name, layer in layers.items() if name.endswith("down_proj")]
    assert plain and all(not is_quantized(layer.weight) and layer.k for layer in plain)  # chosen there too
    if init == "correction":  # values start at the error of quantized entries only; a plain layer's stay at 0
        assert all(float(layer.values.abs().max()) < 1e-6 for layer in plain)
        assert any(float(layer.values.abs().max()) > 1e-4 for name, layer in layers.items() if layer not in plain)


def test_skip_patterns_keep_commas_inside_brackets_and_drop_repeats():
    assert skip_patterns("model.layers.[0,1].*, *.down_proj,*.down_proj") == ["model.layers.[0,1].*", "*.down_proj"]


@pytest.mark.parametrize("skip, targets, message", [
    (["lm_head"], None, r"quantize_skip names lm_head, which the diff does not target"),
    (["*.down_proj"], "q_proj", r"quantize_skip names model\.layers\.0\.mlp\.down_proj, .* which the diff does not"),
    (["*_proj"], None, r"leaves none of the targeted layers quantized: drop --quantize"),
])
def test_skips_the_fingerprint_could_not_check_are_refused(train_file, tmp_path, skip, targets, message):
    model = make_tiny_llama(tie_word_embeddings=False) if skip == ["lm_head"] else make_tiny_llama()
    extra = {"target_modules": targets} if targets else {}
    cfg = quick_config(train_file, tmp_path / "run", steps=2, quantize="nf4", quantize_skip=skip, **extra)
    with pytest.raises(ConfigError, match=message):
        run_training(cfg, model=model, tokenizer=make_tiny_tokenizer())


def test_a_skip_pattern_that_names_no_layer_stops_the_run_before_selection(train_file, tmp_path, monkeypatch):
    import sparseft.methods.sparse as sparse_method

    def no_selection(*args, **kwargs):
        raise AssertionError("selection ran")

    monkeypatch.setattr(sparse_method, "select_masks", no_selection)
    cfg = quick_config(train_file, tmp_path / "run", steps=2, quantize="nf4", quantize_skip=["*.dwn_proj"])
    with pytest.raises(ConfigError, match=r"quantize_skip pattern '\*\.dwn_proj' matches no linear layer"):
        run_training(cfg, model=make_tiny_llama(), tokenizer=make_tiny_tokenizer())
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (dict(quantize_skip=["*.down_proj"]), "quantize_skip names layers to leave unquantized: it needs quantize"),
    (dict(quantize="nf4", quantize_skip=[3]), "quantize_skip must be a list of layer-name patterns"),
])
def test_bad_quantize_skip_settings_are_refused(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        quick_config(tmp_path / "train.jsonl", tmp_path / "out", **overrides)


def test_importing_sparseft_and_peft_prints_none_of_torchaos_import_noise():
    # torchao logs failed CUDA kernel loads and a pytree deprecation on import (peft imports it too);
    # sparseft drops exactly those records, and a different warning of the same logger still shows.
    code = ("import logging, sparseft, peft, torchao; "
            "logging.getLogger('torchao').warning('a warning that must still show')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Failed to load" not in done.stderr
    assert "Enum subclass" not in done.stderr
    assert "a warning that must still show" in done.stderr
