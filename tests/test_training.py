import hashlib
import json
import os
import random
import re
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from conftest import make_tiny_llama, make_tiny_tokenizer
from sparseft import SparseModel
from sparseft.cli import main
from sparseft.errors import ConfigError
from sparseft.training import TrainConfig, run_training
from sparseft.training import loop as loop_module
from sparseft.training.data import collate, load_examples

WORDS = {"good": " pos", "great": " pos", "fine": " pos", "bad": " neg", "awful": " neg", "poor": " neg"}


def write_train_file(path, n=32, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            word = rng.choice(sorted(WORDS))
            f.write(json.dumps({"prompt": f"review: {word} ->", "completion": WORDS[word]}) + "\n")
    return path


@pytest.fixture
def train_file(tmp_path):
    return write_train_file(tmp_path / "train.jsonl")


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def quick_config(train_file, out, **overrides):
    # Loop tests: random entries, so the mask does not depend on the calibration batches (which change with batch_size).
    values = dict(model="tiny", data=str(train_file), out=str(out), density=0.1, steps=4, lr=1e-2, batch_size=4,
                  scorer="random",
                  max_length=64, seed=0, progress=False, value_dtype="float32")
    values.update(overrides)
    return TrainConfig.from_dict(values)


def train_in_process(cfg):
    return run_training(cfg, model=make_tiny_llama(), tokenizer=make_tiny_tokenizer())


def mean_completion_loss(model, examples):
    batch = collate(examples, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(loop_module.completion_loss_sum(logits, batch["labels"]) / (batch["labels"][:, 1:] != -100).sum())


def test_cli_train_writes_a_loadable_diff_and_the_loss_falls(tiny_model_with_tokenizer_dir, train_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_model_with_tokenizer_dir), "--data", str(train_file), "--out", str(out),
                 "--density", "0.1", "--steps", "12", "--lr", "1e-2", "--batch-size", "8", "--save-every", "5",
                 "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["last_loss"] < summary["first_loss"]
    assert summary["selection_wall_s"] > 0  # the entries were chosen in this run (the default scorer)
    assert {"sparse_config.json", "sparse_delta.safetensors", "metrics.jsonl", "train_config.yaml", "checkpoints"} <= {
        p.name for p in out.iterdir()}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000005", "step-000010", "train_config.yaml"]

    examples = load_examples(train_file, make_tiny_tokenizer(), max_length=512)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_with_tokenizer_dir)
    before = mean_completion_loss(base, examples)
    tuned = SparseModel.from_pretrained(base, out)
    assert tuned.num_trainable() == 0 and len(tuned.sparse_layers()) == 14
    assert mean_completion_loss(tuned, examples) < before - 0.05

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert {"loss", "lr", "tokens_per_s", "peak_memory_bytes", "grad_norm"} <= set(metrics[0])
    assert metrics[0]["lr"] > metrics[-1]["lr"]  # cosine decay
    saved = TrainConfig.from_yaml(out / "train_config.yaml")
    assert saved.steps == 12 and saved.selection.density == 0.1 and saved.model == str(tiny_model_with_tokenizer_dir)

    provenance = json.loads((out / "sparse_config.json").read_text())["provenance"]
    assert provenance["data_sha256"] == sha256(train_file)
    assert provenance["seed"] == 0 and provenance["steps"] == 12
    assert provenance["train_config"]["lr"] == 0.01 and "out" not in provenance["train_config"]


def test_same_seed_gives_the_same_diff_bytes(train_file, tmp_path):
    a = train_in_process(quick_config(train_file, tmp_path / "a"))
    b = train_in_process(quick_config(train_file, tmp_path / "b"))
    c = train_in_process(quick_config(train_file, tmp_path / "c", seed=1))
    delta = "sparse_delta.safetensors"
    assert sha256(a.out / delta) == sha256(b.out / delta)
    assert sha256(a.out / "sparse_config.json") == sha256(b.out / "sparse_config.json")
    assert sha256(a.out / "README.md") == sha256(b.out / "README.md")  # the model card too
    assert sha256(a.out / delta) != sha256(c.out / delta)
    assert a.losses == b.losses


def train_until_crash(monkeypatch, cfg, crash_at_call: int) -> None:
    """Train with a simulated crash (KeyboardInterrupt) at the ``crash_at_call``-th call of train_step."""
    real_step, calls = loop_module.train_step, []

    def crashing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == crash_at_call:
            raise KeyboardInterrupt("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop_module, "train_step", crashing_step)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_in_process(cfg)
    finally:
        monkeypatch.setattr(loop_module, "train_step", real_step)


def test_resume_after_a_crash_gives_the_uninterrupted_diff(train_file, tmp_path, monkeypatch):
    settings = dict(steps=6, save_every=2, grad_accum=2, batch_size=2, warmup_steps=2)
    reference = train_in_process(quick_config(train_file, tmp_path / "ref", **settings))

    out = tmp_path / "crashed"
    train_until_crash(monkeypatch, quick_config(train_file, out, **settings), crash_at_call=4)
    assert not (out / "sparse_delta.safetensors").exists()  # no final diff from a crashed run
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "train_config.yaml"]

    resumed = train_in_process(quick_config(train_file, out, resume="latest", **settings))
    assert sha256(resumed.out / "sparse_delta.safetensors") == sha256(reference.out / "sparse_delta.safetensors")
    assert sha256(resumed.out / "sparse_config.json") == sha256(reference.out / "sparse_config.json")
    assert resumed.losses == reference.losses[2:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the crashed run's step 3 was dropped and redone

    # A checkpoint is only resumed under the settings it was made with.
    changed = {**settings, "batch_size": 4}
    with pytest.raises(ConfigError, match=r"cannot resume.*batch_size: 2 -> 4"):
        train_in_process(quick_config(train_file, out, resume=str(out / "checkpoints" / "step-000004"), **changed))


def test_gradient_accumulation_matches_the_bigger_batch(train_file, tmp_path):
    whole = train_in_process(quick_config(train_file, tmp_path / "whole", batch_size=4, grad_accum=1))
    accumulated = train_in_process(quick_config(train_file, tmp_path / "acc", batch_size=2, grad_accum=2))
    torch.testing.assert_close(torch.tensor(accumulated.losses), torch.tensor(whole.losses), rtol=1e-5, atol=1e-6)
    a = SparseModel.from_pretrained(make_tiny_llama(), whole.out).sparse_parameters()
    b = SparseModel.from_pretrained(make_tiny_llama(), accumulated.out).sparse_parameters()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


BAD_FILES = {
    "missing.jsonl": ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', "missing.jsonl:line 2: missing field 'completion'"),
    "empty.jsonl": ('{"prompt": "a", "completion": ""}\n', "empty.jsonl:line 1: field 'completion' is empty"),
    "broken.jsonl": ('{"prompt": "a", "completion": "b"\n', "broken.jsonl:line 1: invalid JSON"),
    "long.jsonl": (json.dumps({"prompt": "x" * 100, "completion": " y"}) + "\n", "long.jsonl:line 1: example is 103 tokens"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_data_is_rejected_before_anything_is_written(name, tiny_model_with_tokenizer_dir, tmp_path, capsys):
    content, message = BAD_FILES[name]
    (tmp_path / name).write_text(content)
    out = tmp_path / "out"
    code = main(["train", "--model", str(tiny_model_with_tokenizer_dir), "--data", str(tmp_path / name), "--out",
                 str(out), "--max-length", "64", "--steps", "1", "--no-progress"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_yaml_config_with_flag_overrides(tiny_model_with_tokenizer_dir, train_file, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_model_with_tokenizer_dir), "data": str(train_file), "density": 0.05,
                                      "steps": 5, "batch_size": 4, "scorer": "magnitude", "progress": False}))
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--out", str(out), "--steps", "2"]) == 0
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["steps"] == 2 and saved["scorer"] == "magnitude" and saved["density"] == 0.05
    assert json.loads((out / "sparse_config.json").read_text())["selection"]["scorer"] == "magnitude"
    (tmp_path / "bad.yaml").write_text("stepz: 3\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2


def test_masks_from_an_earlier_diff_are_trained_again(train_file, tmp_path):
    first = train_in_process(quick_config(train_file, tmp_path / "a", steps=2))
    second = train_in_process(quick_config(train_file, tmp_path / "b", steps=2, masks=str(first.out), seed=5, density=0.5))
    m1 = SparseModel.from_pretrained(make_tiny_llama(), first.out)
    m2 = SparseModel.from_pretrained(make_tiny_llama(), second.out)
    for (n1, l1), (n2, l2) in zip(m1.sparse_layers().items(), m2.sparse_layers().items()):
        assert n1 == n2 and torch.equal(l1.indices, l2.indices)
    assert second.trainable == first.trainable


def test_full_and_lora_baselines_save_natural_formats_and_the_same_metrics(train_file, tmp_path):
    from peft import PeftModel

    sparse = train_in_process(quick_config(train_file, tmp_path / "sparse", steps=2))
    full = train_in_process(quick_config(train_file, tmp_path / "full", steps=2, method="full", lr=1e-3))
    lora = train_in_process(quick_config(train_file, tmp_path / "lora", steps=2, method="lora", lora_match_sparse=True))

    assert full.trainable == full.total_params == sum(p.numel() for p in make_tiny_llama().parameters())
    merged = AutoModelForCausalLM.from_pretrained(full.out)
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, make_tiny_llama().model.layers[0].self_attn.q_proj.weight)
    assert (full.out / "tokenizer.json").is_file()

    adapter = PeftModel.from_pretrained(make_tiny_llama(), lora.out)
    assert sum(p.numel() for n, p in adapter.named_parameters() if "lora_" in n) == lora.trainable
    # rank chosen so LoRA trains about as many parameters as the sparse run (within one rank's worth)
    per_rank = lora.trainable // lora.extra["lora_rank"]
    assert abs(lora.trainable - sparse.trainable) <= per_rank
    assert lora.total_params == sparse.total_params

    keys = [set(json.loads((r.out / "metrics.jsonl").read_text().splitlines()[0])) for r in (sparse, full, lora)]
    assert keys[0] == keys[1] == keys[2]
    for r in (sparse, full, lora):
        # AdamW: exp_avg + exp_avg_sq in fp32 per trainable number, plus one step counter per tensor (< 64 here)
        assert 8 * r.trainable < r.optimizer_state_bytes <= 8 * r.trainable + 4 * 64
        assert r.artifact_bytes > 0 and r.peak_memory_bytes > 0 and r.median_step_s > 0
    assert sparse.artifact_bytes < lora.artifact_bytes < full.artifact_bytes


def test_bf16_autocast_trains_sparse_values(train_file, tmp_path):
    """The mixed-precision path (bf16 matmuls, fp32 values and optimizer state), run on CPU."""
    result = train_in_process(quick_config(train_file, tmp_path / "bf16", precision="bf16", steps=3))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    values = SparseModel.from_pretrained(make_tiny_llama(), result.out).sparse_parameters()
    assert all(v.dtype == torch.float32 and float(v.abs().max()) > 0 for v in values)


def test_yaml_numbers_in_exponent_form_are_numbers(train_file, tmp_path):
    """PyYAML reads ``1e-3`` (no dot) as a string; the config converts it instead of failing mid-run."""
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {train_file}\nout: {tmp_path / 'out'}\nlr: 1e-2\ndensity: 1e-1\nbatch_size: 4.0\n"
                      "steps: 2\nwarmup_ratio: 5e-1\nmax_grad_norm: '1'\nvalue_dtype: float32\nprogress: false\n")
    cfg = TrainConfig.from_yaml(config)
    assert (cfg.lr, cfg.selection.density, cfg.batch_size, cfg.warmup_ratio, cfg.max_grad_norm) == (0.01, 0.1, 4, 0.5, 1.0)
    assert type(cfg.lr) is float and type(cfg.selection.density) is float and type(cfg.batch_size) is int
    assert type(cfg.sparse_config().density) is float
    result = train_in_process(cfg)
    assert len(result.losses) == 2


@pytest.mark.parametrize("line, message", [
    ("lr: fast", "lr must be a number, got 'fast'"),
    ("batch_size: 8.5", "batch_size must be a whole number, got 8.5"),
    ("steps: 1e-1", "steps must be a whole number, got '1e-1'"),
    ("density: [1]", "density must be a number, got [1]"),
    ("lr: .nan", "lr must be a finite number"),
    ("truncation: 'no'", "truncation must be true or false, got 'no'"),
    ("lr: -1e-3", "lr must be > 0"),
    ("weight_decay: -5", "weight_decay must be >= 0, got -5.0"),
    ("max_grad_norm: -1", "max_grad_norm must be > 0 (or null: no clipping), got -1.0"),
    ("min_lr_ratio: 7", "min_lr_ratio must be in [0, 1]"),
    ("lora_alpha: -3", "lora_alpha must be > 0"),
    ("seed: 99999999999999999999", "seed must be in [-9223372036854775808, 18446744073709551615]"),
    ("data: 5", "data must be a string, got 5 (int)"),
    ("dtype: [x]", "dtype must be a string, got ['x'] (list)"),
])
def test_bad_yaml_values_name_file_line_and_field(tmp_path, line, message):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: tiny\n{line}\n")
    with pytest.raises(ConfigError, match=re.escape(f"run.yaml:line 2: {message}")):
        TrainConfig.from_yaml(config)
    # A flag given on the command line wins over the file, so the file's bad value no longer matters.
    field = line.split(":")[0]
    good = {"lr": 1e-3, "batch_size": 8, "steps": 3, "density": 0.5, "truncation": True, "weight_decay": 0.0,
            "max_grad_norm": 1.0, "min_lr_ratio": 0.1, "lora_alpha": 16.0, "seed": 3, "data": "d.jsonl",
            "dtype": "bfloat16"}[field]
    assert TrainConfig.from_yaml(config, **{field: good}).to_dict()[field] == good


def test_config_keys_that_are_not_names_and_masks_for_a_method_without_them_are_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: tiny\n1: 2\n")
    with pytest.raises(ConfigError, match="field names must be strings, got 1 \\(int\\)"):
        TrainConfig.from_yaml(config)
    config.write_bytes(b"model: tiny\nlr: \xff\n")
    with pytest.raises(ConfigError, match="run.yaml:line 2: not UTF-8 text"):
        TrainConfig.from_yaml(config)
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
        run_training(TrainConfig(model="tiny", data=str(config), out=str(tmp_path / "o"), device="gpu0"))
    # A full or LoRA run trains no mask: --masks would be ignored without a word.
    with pytest.raises(ConfigError, match="masks applies to sparse runs only .* not method='full'"):
        TrainConfig(model="tiny", method="full", masks="d1")
    assert TrainConfig(model="tiny", data=tmp_path / "d.jsonl").data == str(tmp_path / "d.jsonl")  # a path is a string


def test_training_into_the_base_models_directory_is_refused_before_anything_loads(tiny_model_dir, train_file,
                                                                                    tmp_path):
    before = sorted(p.name for p in tiny_model_dir.iterdir())
    with pytest.raises(ConfigError, match="holds files sparseft did not write"):
        run_training(quick_config(train_file, tiny_model_dir, model=str(tiny_model_dir)))  # no model passed: none loads
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == before
    first = train_in_process(quick_config(train_file, tmp_path / "run", steps=1))
    assert train_in_process(quick_config(train_file, first.out, steps=1)).out == first.out  # an earlier run: replaced
    # ... unless it holds the data: replacing the run would have deleted the file being trained on.
    kept = Path(first.out) / "train.jsonl"
    kept.write_bytes(Path(train_file).read_bytes())
    with pytest.raises(ConfigError, match="holds .*train.jsonl, an input of this command"):
        run_training(quick_config(kept, first.out, steps=1))
    assert kept.read_bytes() == Path(train_file).read_bytes()


def test_training_into_the_diff_given_as_masks_is_refused_and_keeps_it(train_file, tmp_path):
    # --out A --masks A had replaced diff A, the entries' source and its trained values, with the new run.
    first = train_in_process(quick_config(train_file, tmp_path / "a", steps=2))
    before = tree_bytes(first.out)
    with pytest.raises(ConfigError, match=r"--out .*a: is .*a, an input of this command"):
        run_training(quick_config(train_file, first.out, steps=1, masks=str(first.out)))  # no model passed: none loads
    assert tree_bytes(first.out) == before


def test_sparse_config_yaml_converts_numbers(tmp_path):
    from sparseft import SparseConfig

    path = tmp_path / "sparse.yaml"
    path.write_text("density: 1e-2\ncalibration_batches: 4.0\nseed: '3'\nscorer_weights: {gradient: 5e-1, fisher: 5e-1}\n")
    cfg = SparseConfig.from_yaml(path)
    assert (cfg.density, cfg.calibration_batches, cfg.seed) == (0.01, 4, 3)
    assert type(cfg.density) is float and cfg.scorer_weights == {"gradient": 0.5, "fisher": 0.5}
    with pytest.raises(ConfigError, match="num_params must be a whole number, got 10.5"):
        SparseConfig(num_params=10.5)


def test_per_module_with_num_params_is_refused_by_the_train_config_before_a_model_loads(tmp_path):
    # A stored diff may record per_module with its exact entry count; a run cannot ask for one.
    from sparseft import SparseConfig
    from sparseft.training.config import TrainConfig

    kept = SparseConfig(num_params=10, allocation="per_module")
    assert kept.num_params == 10
    with pytest.raises(ConfigError, match="per_module.*cannot hit an exact num_params"):
        TrainConfig(model="tiny", data="d.jsonl", out=str(tmp_path / "o"), selection=kept)


def test_masks_keep_the_selection_settings_they_were_chosen_with(train_file, tmp_path):
    """``train --masks`` records how its entries were chosen (the mask file's or diff's config), not the
    train run's own scorer/allocation/seed flags, which chose nothing."""
    from sparseft import SparseConfig
    from sparseft.selection import save_masks, select
    from sparseft.targets import find_targets

    model = make_tiny_llama()
    chosen = SparseConfig(density=0.05, scorer="magnitude", allocation="global", seed=7, target_modules=["q_proj", "v_proj"])
    masks = select(model, chosen)
    shapes = {n: tuple(t.weight.shape) for n, t in find_targets(model, chosen.target_modules).items()}
    mask_file = save_masks(tmp_path / "masks.safetensors", masks, shapes, chosen)

    from_file = train_in_process(quick_config(train_file, tmp_path / "a", steps=1, masks=str(mask_file)))
    selection = json.loads((from_file.out / "sparse_config.json").read_text())["selection"]
    assert (selection["scorer"], selection["allocation"], selection["seed"]) == ("magnitude", "global", 7)
    assert selection["target_modules"] == ["q_proj", "v_proj"] and selection["value_dtype"] == "float32"
    assert selection["num_params"] == from_file.trainable == sum(m.numel() for m in masks.values())

    from_diff = train_in_process(quick_config(train_file, tmp_path / "b", steps=1, masks=str(from_file.out), seed=3))
    again = json.loads((from_diff.out / "sparse_config.json").read_text())["selection"]
    assert again == selection


def tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("steps", [2, 1])
def test_resume_with_no_steps_left_is_refused_and_changes_nothing(steps, train_file, tmp_path, capsys):
    out = tmp_path / "run"
    train_in_process(quick_config(train_file, out, steps=4, save_every=2))
    before = tree_bytes(out)
    with pytest.raises(ConfigError, match=rf"step-000002: the checkpoint is at step 2, .* {steps} steps"):
        train_in_process(quick_config(train_file, out, steps=steps, save_every=2,
                                      resume=str(out / "checkpoints" / "step-000002")))
    assert tree_bytes(out) == before


def test_a_missing_or_empty_resume_or_masks_is_refused_before_anything_loads(train_file, tmp_path):
    # Was: a missing checkpoint or mask file was named only after the model and the data had loaded; --resume ""
    # started afresh, deleting the checkpoints it was to resume; --masks "" chose new entries without a word. A
    # missing --resume then named the path but not the flag, and called it "not a checkpoint directory".
    out = tmp_path / "run"
    train_in_process(quick_config(train_file, out, steps=4, save_every=2))
    before = tree_bytes(out)
    cases = [(dict(resume=str(tmp_path / "nope")), r"--resume .*nope: no such checkpoint directory"),
             (dict(resume=str(tmp_path)), r"--resume .*: not a checkpoint directory \(state.json missing\)"),
             (dict(resume=""), r"--resume is empty \(''\)"),
             (dict(masks=str(tmp_path / "nope")), r"--masks .*nope: no such diff directory or mask file"),
             (dict(masks=""), r"--masks is empty \(''\)")]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):  # no model passed: had one loaded, "tiny" would be refused
            run_training(quick_config(train_file, out, steps=6, save_every=2, **overrides))
    assert tree_bytes(out) == before


def test_cli_summary_of_a_run_without_losses_does_not_crash(monkeypatch, capsys):
    """The CLI summary guards an empty loss list (as bench/worker.py does) instead of an IndexError."""
    import sparseft.training as training
    from sparseft.training.job import TrainResult

    empty = TrainResult(out="x", method="sparse", steps=0, losses=[], trainable=1, total_params=2, wall_time_s=0.0,
                        median_step_s=0.0, tokens_per_s=0.0, peak_memory_bytes=0, optimizer_state_bytes=0,
                        artifact_bytes=0)
    monkeypatch.setattr(training, "run_training", lambda cfg: empty)
    assert main(["train", "--model", "m", "--data", "d.jsonl", "--out", "o"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["first_loss"] is None and summary["last_loss"] is None
    from sparseft.demo import loss_span

    assert loss_span(None, None) == "n/a (no step ran)" and loss_span(2.0, 1.5) == "2.000 -> 1.500"


def test_metrics_log_resume_drops_a_partial_last_line_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + '\n{"step": 4, "lo')  # the crash hit while step 4 was being written
    with pytest.warns(UserWarning, match=r"metrics.jsonl:line 4: dropping a partial last line"):
        loop_module.MetricsLog(path, True, resume_step=2)
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"

    path.write_text(lines[0] + '\n{"step": 2, "lo\n' + lines[2] + "\n")
    with pytest.raises(ConfigError, match=r"metrics.jsonl:line 2: cannot resume, the metrics log is damaged"):
        loop_module.MetricsLog(path, True, resume_step=2)
    assert path.read_text() == lines[0] + '\n{"step": 2, "lo\n' + lines[2] + "\n"  # left as it was


def test_a_crashed_fresh_run_leaves_the_earlier_result_and_its_config(train_file, tmp_path, monkeypatch):
    """train_config.yaml describes the published artifact: it is written with it, not before training; the
    run in progress keeps its own copy under checkpoints/ to resume from."""
    out = tmp_path / "run"
    train_in_process(quick_config(train_file, out, steps=2))
    before = tree_bytes(out)
    train_until_crash(monkeypatch, quick_config(train_file, out, steps=4, lr=5e-3, save_every=2), crash_at_call=3)
    for name in ("train_config.yaml", "sparse_config.json", "sparse_delta.safetensors"):
        assert (out / name).read_bytes() == before[name], name

    # The interrupted run resumes from its own config; a partial metrics line left by the crash is dropped.
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')
    in_progress = TrainConfig.from_yaml(out / "checkpoints" / "train_config.yaml", resume="latest")
    assert (in_progress.steps, in_progress.lr) == (4, 5e-3)
    with pytest.warns(UserWarning, match="partial last line"):
        train_in_process(in_progress)
    published = TrainConfig.from_yaml(out / "train_config.yaml")
    assert (published.steps, published.lr, published.resume) == (4, 5e-3, None)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_a_masks_path_that_is_neither_diff_nor_mask_file_is_named(train_file, tmp_path):
    from sparseft.errors import MaskFileError

    bogus = tmp_path / "masks.safetensors"
    bogus.write_text("not safetensors")
    with pytest.raises(MaskFileError, match=r"masks.safetensors: not a readable safetensors file"):
        train_in_process(quick_config(train_file, tmp_path / "out", steps=1, masks=str(bogus)))
    assert not (tmp_path / "out").exists()


def documented_train_commands(text):
    """The argument lists of every ``sparseft train`` command in the fenced bash blocks of a doc."""
    import shlex

    commands = []
    inline = [span for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", text) if span.startswith("sparseft train ")]
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S) + inline:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "sparseft" in words and words[words.index("sparseft") + 1:][:1] == ["train"]:
                commands.append(words[words.index("sparseft") + 2:])
    return commands


def test_every_train_command_in_docs_training_md_parses():
    from pathlib import Path

    from sparseft.cli import build_parser
    from sparseft.cli.train import config_from_args
    from sparseft.loading import ALIASES

    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    commands = documented_train_commands(text)
    assert len(commands) >= 9
    for words in commands:
        try:
            args = build_parser().parse_args(["train", *words])
        except SystemExit:
            raise AssertionError(f"docs/training.md: sparseft train {' '.join(words)}: not accepted by the parser")
        assert args.model in (None, "M") or args.model in ALIASES, f"unknown model alias {args.model!r}"
        if not args.config:
            config_from_args(args)  # the values are valid TrainConfig values too
    for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S):
        TrainConfig.from_dict(yaml.safe_load(block))


def test_train_help_shows_each_default_once_and_from_train_config(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "None" not in text
    defaults = TrainConfig()
    for phrase in ("peak learning rate (default: 0.001)", f"(default: {defaults.batch_size})",
                   "share of targeted entries to train (default: 0.01)", "clip the gradient norm to this (default: 1.0)",
                   "(default: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"):
        assert phrase in text, phrase
    # One default per flag: the flags' own texts no longer repeat them by hand.
    sections = re.split(r" (?=--[a-z])", text.split("options:", 1)[1])
    for section in sections:
        assert section.count("default") <= 1, section


def test_a_crash_in_the_final_rename_leaves_checkpoints_where_resume_looks(train_file, tmp_path, monkeypatch):
    import sparseft.atomic as atomic_module

    out = tmp_path / "run"
    settings = dict(steps=4, save_every=2)
    train_until_crash(monkeypatch, quick_config(train_file, out, **settings), crash_at_call=4)  # step 3 lost
    real_replace = atomic_module.replace_dir

    def crash(new, target):
        if target == out:  # publish's rename, not the diff's own one inside the staging directory
            raise KeyboardInterrupt("simulated crash before the final rename")
        real_replace(new, target)

    monkeypatch.setattr(atomic_module, "replace_dir", crash)
    with pytest.raises(KeyboardInterrupt):
        train_in_process(quick_config(train_file, out, resume="latest", **settings))
    monkeypatch.setattr(atomic_module, "replace_dir", real_replace)
    assert list(tmp_path.glob(".run.tmp-*"))  # the staged result of the crashed publish
    assert (out / "checkpoints" / "step-000002" / "state.json").is_file()  # ... and the checkpoints still in out

    # Both resume forms find them; the resumed run publishes and clears the crashed run's staging.
    in_progress = TrainConfig.from_yaml(out / "checkpoints" / "train_config.yaml", resume="latest", steps=6)
    train_in_process(in_progress)
    assert (out / "sparse_delta.safetensors").is_file() and (out / "checkpoints" / "step-000004").is_dir()
    assert not list(tmp_path.glob(".run.*"))


def test_resume_puts_back_an_out_dir_set_aside_by_a_crash_between_the_renames(train_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_until_crash(monkeypatch, quick_config(train_file, out, steps=4, save_every=2), crash_at_call=4)
    aside = tmp_path / ".run.old-abcd1234"
    aside.mkdir()
    os.replace(out, aside / "run")  # where replace_dir's first rename puts it
    train_in_process(quick_config(train_file, out, steps=4, save_every=2, resume="latest"))
    assert (out / "sparse_delta.safetensors").is_file()
    assert not list(tmp_path.glob(".run.*"))


def documented_defaults() -> dict:
    """``{field: value}`` from the table under "## Defaults" in docs/training.md."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    section = text.split("## Defaults", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", section, flags=re.M)
    return {name: yaml.safe_load(value) for name, value in rows}


def test_documented_defaults_equal_train_config():
    documented = documented_defaults()
    assert {"scorer", "allocation", "lr", "warmup_steps", "warmup_ratio", "min_lr_ratio"} <= set(documented)
    for defaults in (TrainConfig().to_dict(), TrainConfig.from_dict({}).to_dict()):  # built directly, or from YAML/flags
        for name, value in documented.items():
            assert defaults[name] == value, name
        assert defaults["scorer"] == "combined"  # the best measured recipe (docs/benchmarks/sst2_smollm2_cpu_sweep.md)
