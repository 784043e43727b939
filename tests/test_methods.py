"""The method registry: nothing outside it branches on a method's name, a new method plugs into
training, evaluation, the CLI and bench rows by registering, and TrainConfig's nested selection."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import make_tiny_llama, make_tiny_tokenizer
from sparseft.cli import build_parser
from sparseft.errors import ConfigError, DiffNotFoundError
from sparseft.evaluate import attach_diff
from sparseft.methods import METHODS, Method, get_method, register_method
from sparseft.training import TrainConfig, run_training

SRC = Path(__file__).resolve().parents[1] / "src" / "sparseft"
REGISTRY = SRC / "methods"

# A method's name compared with a literal: `cfg.method == "lora"`, `row["method"] != 'base'`,
# `"full" == method`, `method in ("sparse", ...)`.
NAME_DISPATCH = re.compile(
    r"""\bmethod\b(?:["']\])?\s*(?:==|!=|(?:not\s+)?in\s+[(\[{])\s*["']"""
    r"""|["']\s*(?:==|!=)\s*[\w.]*\bmethod\b"""
)


def name_dispatch_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if NAME_DISPATCH.search(line)]


def test_the_dispatch_pattern_finds_branches_on_a_method_name():
    code = 'if cfg.method == "lora":\n    x = row["method"] != \'base\'\nif method in ("sparse", "full"):\nok = backend == "x"'
    assert len(name_dispatch_lines(code)) == 3


def test_no_module_outside_the_registry_branches_on_a_method_name():
    found = {
        str(path.relative_to(SRC)): lines
        for path in SRC.rglob("*.py")
        if REGISTRY not in path.parents and (lines := name_dispatch_lines(path.read_text()))
    }
    assert found == {}, f"ask sparseft.methods.get_method(...) instead of comparing names: {found}"


# ---------------------------------------------------------------- a method registered by a test

NORMS_FILE = "norms.safetensors"


class NormsOnly(Method):
    """Train only the RMSNorm scales; the artifact is those tensors in one file."""

    name = "norms-test"
    artifact_kind = "norms"
    help = "train the norm scales only (a test method)"
    artifact_description = f"a norms file ({NORMS_FILE})"

    def prepare(self, cfg, model, examples, pad_id, ckpt):
        for name, param in model.named_parameters():
            param.requires_grad_(name.endswith("norm.weight"))
        return model, None, {"trained": "norms"}

    def save(self, model, tokenizer, path, provenance):
        norms = {n: p.detach().contiguous() for n, p in model.named_parameters() if n.endswith("norm.weight")}
        save_file(norms, str(Path(path) / NORMS_FILE))

    def detect(self, path):
        return (path / NORMS_FILE).is_file()

    def attach(self, model, path, allow_unverified_base=False):
        model.load_state_dict(load_file(str(Path(path) / NORMS_FILE)), strict=False)
        return model


@pytest.fixture
def norms_method():
    method = register_method(NormsOnly())
    yield method
    del METHODS[method.name]


def write_rows(path, n=8):
    rows = [{"prompt": f"review: {w} ->", "completion": c} for w, c in [("good", " pos"), ("bad", " neg")] * (n // 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_registered_method_is_trained_saved_and_attached_without_touching_other_modules(norms_method, tmp_path):
    cfg = TrainConfig.from_dict(dict(model="tiny", data=str(write_rows(tmp_path / "train.jsonl")), out=str(tmp_path / "run"),
                                     method="norms-test", steps=2, lr=1e-1, batch_size=4, max_length=32, progress=False))
    result = run_training(cfg, model=make_tiny_llama(), tokenizer=make_tiny_tokenizer())
    assert result.method == "norms-test" and result.extra == {"trained": "norms"}
    norm_count = sum(p.numel() for n, p in make_tiny_llama().named_parameters() if n.endswith("norm.weight"))
    assert result.trainable == norm_count
    saved = load_file(str(result.out / NORMS_FILE))
    assert any(not torch.equal(t, make_tiny_llama().state_dict()[n]) for n, t in saved.items())  # it trained

    # Evaluation finds the artifact's method by asking every registered method.
    model, kind = attach_diff(make_tiny_llama(), result.out)
    assert kind == "norms-test"
    assert all(torch.equal(model.state_dict()[n], t) for n, t in saved.items())

    # The CLI offers it, and a bench row may use it.
    args = build_parser().parse_args(["train", "--method", "norms-test"])
    assert args.method == "norms-test"
    from sparseft.bench.config import parse_runs
    from sparseft.bench.worker import empty_row

    [run] = parse_runs([{"id": "norms", "method": "norms-test", "lr": 0.1}], "grid.yaml")
    job = {"run": run.to_dict(), "seed": 0, "steps": 2, "batch_size": 4, "grad_accum": 1, "max_length": 32}
    assert empty_row(job)["artifact_kind"] == "norms"


def test_a_method_only_takes_its_own_bench_knobs(norms_method):
    from sparseft.bench.config import parse_runs

    with pytest.raises(ConfigError, match=r"grid.yaml: runs\[0\] \(n\): lora_rank applies to lora rows only"):
        parse_runs([{"id": "n", "method": "norms-test", "lr": 0.1, "lora_rank": 2}], "grid.yaml")


def test_unknown_methods_and_artifacts_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"method must be one of \('sparse', 'full', 'lora'\), got 'base'"):
        TrainConfig(method="base")  # registered, but it trains nothing
    with pytest.raises(ConfigError, match="unknown method 'dora'; available"):
        get_method("dora")
    with pytest.raises(DiffNotFoundError, match="not a sparse diff .* nor a PEFT adapter"):
        attach_diff(make_tiny_llama(), tmp_path)
    with pytest.raises(ConfigError, match="already registered"):
        register_method(type("Again", (Method,), {"name": "sparse", "artifact_kind": "diff"})())


# ---------------------------------------------------------------- TrainConfig: selection nested, flat keys read


FLAT = """\
model: tiny
density: 0.05
scorer: combined
scorer_weights: {gradient: 0.25, fisher: 0.75}
target_modules: [q_proj, v_proj]
calibration_batches: 2
steps: 3
"""

NESTED = """\
model: tiny
selection:
  density: 0.05
  scorer: combined
  scorer_weights: {gradient: 0.25, fisher: 0.75}
  target_modules: [q_proj, v_proj]
  calibration_batches: 2
steps: 3
"""


def test_flat_and_nested_yaml_give_equal_configs_and_a_written_config_loads_back_equal(tmp_path):
    (tmp_path / "flat.yaml").write_text(FLAT)
    (tmp_path / "nested.yaml").write_text(NESTED)
    flat, nested = TrainConfig.from_yaml(tmp_path / "flat.yaml"), TrainConfig.from_yaml(tmp_path / "nested.yaml")
    assert flat == nested
    assert flat.selection.scorer_weights == {"gradient": 0.25, "fisher": 0.75}
    assert flat.selection.target_modules == ["q_proj", "v_proj"] and flat != TrainConfig.from_dict({"model": "tiny"})
    flat.to_yaml(tmp_path / "written.yaml")
    assert TrainConfig.from_yaml(tmp_path / "written.yaml") == flat
    # A flag wins over the file's value, whichever way the file gives it.
    assert TrainConfig.from_yaml(tmp_path / "nested.yaml", density=0.5).selection.density == 0.5


def test_a_selection_field_given_twice_or_a_selection_seed_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="density is given both at the top level and under selection"):
        TrainConfig.from_dict({"density": 0.1, "selection": {"density": 0.2}})
    with pytest.raises(ConfigError, match="selection.seed: give seed at the top level"):
        TrainConfig.from_dict({"selection": {"seed": 3}})
    assert TrainConfig.from_dict({"seed": 3}).selection.seed == 3  # one seed for selection and data order


@pytest.mark.parametrize("text, message", [
    ("model: tiny\nselection:\n  scorer: fisher\n  density: 2\n", "run.yaml:line 4: density must be in (0, 1]"),
    ("model: tiny\nscorer_weights: {fisher: lots}\n", "run.yaml:line 2: scorer_weights.fisher must be a number"),
    ("model: tiny\nselection:\n  dens1ty: 0.1\n", "unknown SparseConfig field(s) ['dens1ty']"),
    ("model: tiny\nscorer: combined\nscorer_weights: {gradient: 1, bogus: 1}\n",
     "run.yaml:line 3: scorer_weights has an unknown part 'bogus'"),
])
def test_bad_selection_values_name_the_file_and_line(tmp_path, text, message):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig.from_yaml(tmp_path / "run.yaml")


def test_scorer_weights_from_yaml_reach_the_diffs_recorded_config(tmp_path):
    data = write_rows(tmp_path / "train.jsonl")
    (tmp_path / "run.yaml").write_text(
        f"model: tiny\ndata: {data}\nout: {tmp_path / 'run'}\ndensity: 0.05\nscorer: combined\n"
        "scorer_weights: {gradient: 0.2, fisher: 0.8}\ncalibration_batches: 1\nsteps: 1\nbatch_size: 4\n"
        "max_length: 32\nprogress: false\n")
    result = run_training(TrainConfig.from_yaml(tmp_path / "run.yaml"), model=make_tiny_llama(), tokenizer=make_tiny_tokenizer())
    recorded = json.loads((result.out / "sparse_config.json").read_text())
    assert recorded["selection"]["scorer_weights"] == {"gradient": 0.2, "fisher": 0.8}
    assert recorded["provenance"]["train_config"]["scorer_weights"] == {"gradient": 0.2, "fisher": 0.8}
    assert yaml.safe_load((result.out / "train_config.yaml").read_text())["scorer_weights"] == {"gradient": 0.2, "fisher": 0.8}


def test_an_unknown_combined_part_is_refused_by_sparse_config_itself():
    from sparseft import SparseConfig

    with pytest.raises(ConfigError, match=r"unknown part 'bogus'.*allowed parts: \[.*'fisher'.*'gradient'"):
        SparseConfig(scorer="combined", scorer_weights={"fisher": 1.0, "bogus": 1.0})
    with pytest.raises(ConfigError, match=r"scorer_weights.fisher must be a finite number >= 0"):
        SparseConfig(scorer="combined", scorer_weights={"fisher": -1.0})
    # Only the combined scorer reads the weights; another scorer keeps them as given.
    assert SparseConfig(scorer="random", scorer_weights={"bogus": 1.0}).scorer_weights == {"bogus": 1.0}


def test_cli_train_refuses_an_unknown_scorer_part_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from sparseft.cli import main
    from sparseft.training import job

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad scorer_weights were refused")

    monkeypatch.setattr(job, "load_model", no_load)
    data = write_rows(tmp_path / "train.jsonl")
    code = main(["train", "--model", str(tmp_path / "no-such-model"), "--data", str(data), "--out",
                 str(tmp_path / "run"), "--scorer-weights", "bogus=1"])
    err = capsys.readouterr().err
    assert code == 2 and "scorer_weights has an unknown part 'bogus'" in err and "'fisher'" in err
    assert not (tmp_path / "run").exists()


def test_scorer_weights_flag(tmp_path):
    from sparseft.cli.train import config_from_args

    (tmp_path / "run.yaml").write_text("scorer: combined\nscorer_weights: {gradient: 1.0}\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "run.yaml"), "--scorer-weights", "gradient=0.5,fisher=0.5"])
    assert config_from_args(args).selection.scorer_weights == {"gradient": 0.5, "fisher": 0.5}
    args = build_parser().parse_args(["train", "--scorer-weights", "gradient"])
    with pytest.raises(ConfigError, match="scorer_weights must be NAME=WEIGHT pairs"):
        config_from_args(args)


def test_select_defaults_are_trains(tmp_path):
    """`sparseft select` with no flags calibrates as `sparseft train` with none: same selection, batch
    size, max length and seed (so the same first batches)."""
    from sparseft.cli.select import make_train_config

    args = build_parser().parse_args(["select", "--model", "tiny", "--out", str(tmp_path / "m")])
    assert make_train_config(args) == TrainConfig()
    args = build_parser().parse_args(["select", "--model", "tiny", "--out", "m", "--batch-size", "2", "--scorer", "fisher"])
    cfg = make_train_config(args)
    assert (cfg.batch_size, cfg.selection.scorer) == (2, "fisher")
