"""FSDP2-sharded sparse training: 2 CPU processes on gloo (torchrun) hold half the base each and train
the same diff as 1 process with the same global batch; a run killed mid-way resumes under FSDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama
from sparseft import SparseModel
from sparseft.cli import build_parser
from sparseft.cli.train import config_from_args
from sparseft.errors import ConfigError
from test_training import quick_config, train_in_process, write_train_file

TESTS = Path(__file__).resolve().parent
SRC = str(TESTS.parent / "src")
# Values after a few AdamW steps: the sharded run adds Δ(x) beside the base product (unmerged) where
# one process adds S into W (in place), so sums round differently; Adam's normalised steps keep the
# difference near float32 rounding of lr-sized updates (seen: at most 5e-8 on values of about 0.02).
VALUES_TOLERANCE = dict(rtol=1e-4, atol=1e-6)


def run_fsdp_worker(tmp_path: Path, settings: dict, reports: Path, crash_at_call: int | None = None):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    args = [json.dumps({**settings, "fsdp": True}), str(reports)] + ([str(crash_at_call)] if crash_at_call else [])
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(TESTS / "fsdp_worker.py"), *args],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )


def fsdp_settings(data: Path, out: Path, **overrides) -> dict:
    """The tiny run of quick_config, split over 2 processes: global batch 4 = 1 row × 2 micro-batches × 2."""
    cfg = quick_config(data, out, batch_size=1, grad_accum=2, steps=3, **overrides)
    return {k: v for k, v in cfg.to_dict().items() if v is not None}


def assert_same_diff(a_dir: Path, b_dir: Path) -> None:
    a = SparseModel.from_pretrained(make_tiny_llama(), a_dir).sparse_layers()
    b = SparseModel.from_pretrained(make_tiny_llama(), b_dir).sparse_layers()
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name].indices, b[name].indices), name
        torch.testing.assert_close(a[name].values, b[name].values, **VALUES_TOLERANCE)
    assert float(sum(layer.values.abs().sum() for layer in a.values())) > 0


def test_two_fsdp_processes_hold_half_the_base_and_match_one_process(tmp_path):
    data = write_train_file(tmp_path / "train.jsonl", n=16)
    run = run_fsdp_worker(tmp_path, fsdp_settings(data, tmp_path / "fsdp"), tmp_path / "reports")
    assert run.returncode == 0, run.stderr[-3000:]
    single = train_in_process(quick_config(data, tmp_path / "single", batch_size=4, steps=3))

    fsdp_losses = [json.loads(line)["loss"] for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor(fsdp_losses), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)
    assert_same_diff(tmp_path / "fsdp", single.out)

    base_bytes = sum(p.numel() * p.element_size() for p in make_tiny_llama().parameters())
    for rank in (0, 1):
        held = json.loads((tmp_path / "reports" / f"rank-{rank}.json").read_text())["held"]
        assert held["base"] == pytest.approx(base_bytes / 2, rel=0.05)  # its shard of every weight
        assert held["trainable"] == 4 * single.trainable  # the k fp32 values, whole on every rank


@pytest.mark.slow  # three fresh torchrun processes
def test_an_fsdp_run_killed_midway_resumes_to_the_uninterrupted_diff(tmp_path):
    data = write_train_file(tmp_path / "train.jsonl", n=16)
    out = tmp_path / "fsdp"
    settings = fsdp_settings(data, out, save_every=2, warmup_steps=2) | {"steps": 6}
    killed = run_fsdp_worker(tmp_path, settings, tmp_path / "killed", crash_at_call=4)
    assert killed.returncode != 0 and "simulated crash" in killed.stderr
    assert not (out / "sparse_delta.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "train_config.yaml"]

    resumed = run_fsdp_worker(tmp_path, {**settings, "resume": "latest"}, tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = train_in_process(quick_config(data, tmp_path / "single", batch_size=4, steps=6, save_every=2,
                                              warmup_steps=2))
    assert_same_diff(out, reference.out)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the killed run's step 3 was dropped and redone
    losses = json.loads((tmp_path / "resumed" / "rank-0.json").read_text())["losses"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference.losses[2:]), rtol=1e-5, atol=1e-6)


def test_fsdp_flag_reaches_the_config(tmp_path):
    args = build_parser().parse_args(["train", "--model", "tiny", "--data", "d.jsonl", "--out", "o", "--fsdp"])
    assert config_from_args(args).fsdp is True


@pytest.mark.parametrize("overrides, message", [
    (dict(method="full"), r"fsdp shards the frozen base of a sparse run; method='full'"),
    (dict(method="lora"), r"method='lora'"),
    (dict(reselect_every=2), r"fsdp cannot be combined with reselect_every"),
])
def test_fsdp_refuses_what_it_cannot_shard(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        quick_config(tmp_path / "train.jsonl", tmp_path / "out", fsdp=True, **overrides)


def test_fsdp_in_one_process_trains_as_without_it(tmp_path):
    data = write_train_file(tmp_path / "train.jsonl", n=16)
    plain = train_in_process(quick_config(data, tmp_path / "plain", steps=2))
    fsdp = train_in_process(quick_config(data, tmp_path / "fsdp", steps=2, fsdp=True))
    assert fsdp.losses == plain.losses
