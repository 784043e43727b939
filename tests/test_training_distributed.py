"""Data-parallel training: 2 CPU processes on gloo (torchrun) equal 1 process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama, make_tiny_tokenizer
from sparseft import SparseModel
from sparseft.training import TrainConfig, run_training
from test_training import write_train_file

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_two_gloo_processes_match_one_process(tiny_model_with_tokenizer_dir, tmp_path):
    data = write_train_file(tmp_path / "train.jsonl", n=16)
    common = ["--model", str(tiny_model_with_tokenizer_dir), "--data", str(data), "--density", "0.1", "--scorer", "random", "--steps", "3",
              "--lr", "1e-2", "--max-length", "64", "--value-dtype", "float32", "--seed", "0", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sparseft", "train",
         *common, "--batch-size", "2", "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    single = run_training(
        TrainConfig.from_dict(dict(model=str(tiny_model_with_tokenizer_dir), data=str(data), out=str(tmp_path / "single"),
                                   density=0.1, scorer="random", steps=3, lr=1e-2, max_length=64, value_dtype="float32", seed=0,
                                   batch_size=4, progress=False)),
        model=make_tiny_llama(), tokenizer=make_tiny_tokenizer(),
    )
    ddp_losses = [json.loads(line)["loss"] for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)
    a = SparseModel.from_pretrained(make_tiny_llama(), tmp_path / "ddp").sparse_layers()
    b = SparseModel.from_pretrained(make_tiny_llama(), single.out).sparse_layers()
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name].indices, b[name].indices)
        torch.testing.assert_close(a[name].values, b[name].values, rtol=1e-4, atol=1e-6)
    assert float(sum(layer.values.abs().sum() for layer in a.values())) > 0


@pytest.mark.slow  # two fresh torchrun processes: ~20 s idle, longer on a busy 2-core box
def test_reselection_under_two_gloo_processes_matches_one_process(tiny_model_with_tokenizer_dir, tmp_path):
    """Growth gradients are summed over processes: both ranks pick the entries one process picks on
    the whole global batch (the run itself fails if the ranks' masks disagree)."""
    data = write_train_file(tmp_path / "train.jsonl", n=16)
    settings = ["--density", "0.1", "--scorer", "random", "--steps", "4", "--lr", "1e-2", "--max-length", "64", "--value-dtype", "float32",
                "--seed", "0", "--no-progress", "--reselect-every", "2", "--reselect-fraction", "0.5"]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sparseft", "train",
         "--model", str(tiny_model_with_tokenizer_dir), "--data", str(data), *settings, "--batch-size", "2",
         "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    single = run_training(
        TrainConfig.from_dict(dict(model=str(tiny_model_with_tokenizer_dir), data=str(data), out=str(tmp_path / "single"),
                                   density=0.1, scorer="random", steps=4, lr=1e-2, max_length=64, value_dtype="float32", seed=0,
                                   batch_size=4, progress=False, reselect_every=2, reselect_fraction=0.5)),
        model=make_tiny_llama(), tokenizer=make_tiny_tokenizer(),
    )
    a = SparseModel.from_pretrained(make_tiny_llama(), tmp_path / "ddp").sparse_layers()
    b = SparseModel.from_pretrained(make_tiny_llama(), single.out).sparse_layers()
    for name in a:
        assert torch.equal(a[name].indices, b[name].indices), name
        torch.testing.assert_close(a[name].values, b[name].values, rtol=1e-4, atol=1e-6)
    swapped = [json.loads(line).get("reselected") for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert swapped[2] and swapped[2] > 0  # it did move entries (before step 3)


@pytest.mark.slow  # two fresh torchrun processes
def test_growth_over_several_batches_under_two_gloo_processes_matches_one_process(tiny_model_with_tokenizer_dir, tmp_path):
    """2 processes × 2 growth batches each (their step's micro-batch, then the next step's), summed
    over processes, rank the same 4 micro-batches as 1 process with grad_accum 2 and 4 growth batches."""
    data = write_train_file(tmp_path / "train.jsonl", n=16)
    settings = dict(density=0.1, scorer="random", steps=4, lr=1e-2, max_length=64, value_dtype="float32", seed=0,
                    batch_size=2, reselect_every=2, reselect_fraction=0.5)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sparseft", "train",
         "--model", str(tiny_model_with_tokenizer_dir), "--data", str(data), *flags, "--reselect-growth-batches", "2",
         "--no-progress", "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    single = run_training(
        TrainConfig.from_dict(dict(model=str(tiny_model_with_tokenizer_dir), data=str(data), out=str(tmp_path / "single"),
                                   grad_accum=2, reselect_growth_batches=4, progress=False, **settings)),
        model=make_tiny_llama(), tokenizer=make_tiny_tokenizer(),
    )
    one_batch = run_training(
        TrainConfig.from_dict(dict(model=str(tiny_model_with_tokenizer_dir), data=str(data), out=str(tmp_path / "one"),
                                   grad_accum=2, progress=False, **settings)),
        model=make_tiny_llama(), tokenizer=make_tiny_tokenizer(),
    )
    a = SparseModel.from_pretrained(make_tiny_llama(), tmp_path / "ddp").sparse_layers()
    b = SparseModel.from_pretrained(make_tiny_llama(), single.out).sparse_layers()
    c = SparseModel.from_pretrained(make_tiny_llama(), one_batch.out).sparse_layers()
    for name in a:
        assert torch.equal(a[name].indices, b[name].indices), name
        torch.testing.assert_close(a[name].values, b[name].values, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(a[name].indices, c[name].indices) for name in a)  # the 4 batches decided


@pytest.mark.slow  # two fresh torchrun processes
def test_two_gloo_processes_train_masks_with_an_empty_module(tiny_model_with_tokenizer_dir, tmp_path):
    """A module with k=0 (here from --masks) has nothing to train: DDP must not wait for its gradient
    (it used to fail with 'Expected to have finished reduction in the prior iteration')."""
    from sparseft import SparseConfig, select
    from sparseft.selection import save_masks
    from sparseft.targets import find_targets

    base, cfg = make_tiny_llama(), SparseConfig(density=0.1, scorer="random")
    masks = select(base, cfg)
    empty = "model.layers.0.self_attn.v_proj"
    masks[empty] = torch.zeros(0, dtype=torch.long)
    shapes = {n: tuple(t.weight.shape) for n, t in find_targets(base, cfg.target_modules).items()}
    save_masks(tmp_path / "masks.safetensors", masks, shapes, cfg)
    data = write_train_file(tmp_path / "train.jsonl", n=16)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sparseft", "train",
         "--model", str(tiny_model_with_tokenizer_dir), "--data", str(data), "--masks", str(tmp_path / "masks.safetensors"),
         "--steps", "2", "--lr", "1e-2", "--max-length", "64", "--value-dtype", "float32", "--seed", "0",
         "--no-progress", "--batch-size", "2", "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    layers = SparseModel.from_pretrained(make_tiny_llama(), tmp_path / "ddp").sparse_layers()
    assert layers[empty].k == 0 and set(layers) == set(masks)
    assert float(sum(layer.values.abs().sum() for layer in layers.values())) > 0
