"""Diffs by Hub id (``org/name``), resolved offline from an HF cache built in tmp_path, and the model card."""

from __future__ import annotations

import json
import shutil

import huggingface_hub.constants as hub_constants
import pytest
import torch

from sparseft import SparseConfig, SparseModel, get_sparse_model
from sparseft.audit.verify import verify_diff
from sparseft.cli import main
from sparseft.diffio import CONFIG_NAME, DELTA_NAME, read_diff
from sparseft.errors import DiffNotFoundError
from sparseft.hub import CARD_NAME, model_card, parse_repo_id, resolve_diff

from conftest import make_tiny_llama

REVISION = "0123456789abcdef0123456789abcdef01234567"


def save_diff(path, seed=0, provenance=None):
    model = get_sparse_model(make_tiny_llama(), SparseConfig(density=0.05, scorer="random", seed=seed))
    with torch.no_grad():
        for p in model.sparse_parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return model.save_pretrained(path, provenance=provenance)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline HF hub cache; ``put(repo_id, diff_dir, revision)`` lays a diff out as a downloaded snapshot."""
    cache = tmp_path / "hf-hub-cache"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)

    def put(repo_id: str, diff_dir, revision: str = REVISION, ref: str = "main"):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(diff_dir, repo / "snapshots" / revision)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(revision)
        return repo / "snapshots" / revision

    return put


def test_repo_ids_and_local_paths():
    assert parse_repo_id("org/name") == ("org/name", None)
    assert parse_repo_id("org/name@v1") == ("org/name", "v1")
    assert parse_repo_id("runs/a/b") is None and parse_repo_id("diff") is None


def test_from_pretrained_and_cli_take_a_hub_id_offline(hub_cache, tmp_path, tiny_model_dir):
    local = save_diff(tmp_path / "local-diff")
    snapshot = hub_cache("my-org/tiny-diff", local)
    assert resolve_diff("my-org/tiny-diff") == snapshot
    assert resolve_diff(f"my-org/tiny-diff@{REVISION}") == snapshot
    by_id = SparseModel.from_pretrained(make_tiny_llama(), "my-org/tiny-diff")
    by_dir = SparseModel.from_pretrained(make_tiny_llama(), local)
    for name, layer in by_id.sparse_layers().items():
        assert torch.equal(layer.values, by_dir.sparse_layers()[name].values)
    assert main(["verify", "--diff", "my-org/tiny-diff", "--model", str(tiny_model_dir)]) == 0
    assert main(["apply", "--model", str(tiny_model_dir), "--diff", "my-org/tiny-diff", "--out", str(tmp_path / "m")]) == 0


def test_audit_of_a_hub_id_reports_into_the_working_directory(hub_cache, tmp_path, tiny_model_with_tokenizer_dir):
    hub_cache("my-org/tiny-diff", save_diff(tmp_path / "local-diff"))
    code = main(["audit", "--model", str(tiny_model_with_tokenizer_dir), "--diff", "my-org/tiny-diff"])
    assert code in (0, 1)  # pass or a crossed drift limit; either way a report, not the HF cache, is written
    assert (tmp_path / "tiny-diff-audit" / "audit.json").is_file()


def test_a_repo_missing_from_the_offline_cache_is_a_clear_error(hub_cache, capsys):
    with pytest.raises(DiffNotFoundError, match=r"my-org/absent.*no snapshot of repository 'my-org/absent'.*offline"):
        SparseModel.from_pretrained(make_tiny_llama(), "my-org/absent")
    assert main(["inspect", "my-org/absent"]) == 2
    assert "no snapshot of repository" in capsys.readouterr().err


def test_model_card_is_written_deterministic_and_outside_the_hashes(tmp_path):
    provenance = {"data_file": "train.jsonl", "data_sha256": "ab" * 32, "steps": 12, "seed": 0,
                  "metrics": {"accuracy": 0.75}}
    a = save_diff(tmp_path / "a", provenance=provenance)
    b = save_diff(tmp_path / "b", provenance=provenance)
    for name in (CONFIG_NAME, DELTA_NAME, CARD_NAME):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    card = (a / CARD_NAME).read_text()
    diff = read_diff(a)
    assert "library_name: sparseft" in card and f"sha256 `{'ab' * 32}`" in card
    assert "base_model:" not in card  # the tiny base has no Hub id; the Hub would refuse a made-up one
    diff.base_model = "my-org/base"
    assert "base_model: my-org/base" in model_card(diff)
    assert all(digest in card for digest in diff.base_fingerprint.values())
    assert "scorer `random`, density 0.05" in card and "| metric: accuracy | 0.75 |" in card
    assert CARD_NAME not in json.loads((a / CONFIG_NAME).read_text())["file_hashes"]
    (a / CARD_NAME).write_text("# edited by hand\n")  # a card may be edited; the diff stays valid
    read_diff(a)
    assert all(r.status != "fail" for r in verify_diff(a, make_tiny_llama()))
    (a / CARD_NAME).unlink()  # and a diff without one (written before cards existed) still reads
    read_diff(a)


def test_a_diff_whose_provenance_lists_metrics_or_versions_still_saves_with_a_card(tmp_path):
    # Provenance is free-form: a list of metrics, or versions as one string, made save_pretrained raise AttributeError.
    path = save_diff(tmp_path / "d", provenance={"metrics": [0.5, 0.75], "versions": "sparseft 0.1"})
    card = (path / CARD_NAME).read_text()
    assert "| metrics | [0.5, 0.75] |" in card and "| made with | sparseft 0.1 |" in card
    assert read_diff(path).provenance["metrics"] == [0.5, 0.75]


def test_compose_diff_stats_and_serve_take_hub_ids_offline(hub_cache, tmp_path, monkeypatch, capsys):
    a, b = save_diff(tmp_path / "a", seed=1), save_diff(tmp_path / "b", seed=2)
    hub_cache("my-org/diff-a", a)
    hub_cache("my-org/diff-b", b)
    assert main(["compose", "my-org/diff-a", "my-org/diff-b", "--out", str(tmp_path / "by-id"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in report["inputs"]] == ["my-org/diff-a", "my-org/diff-b"]
    assert main(["compose", str(a), str(b), "--out", str(tmp_path / "by-dir")]) == 0
    assert (tmp_path / "by-id" / DELTA_NAME).read_bytes() == (tmp_path / "by-dir" / DELTA_NAME).read_bytes()
    assert main(["diff-stats", "my-org/diff-a", str(b), "--json"]) == 0

    import sparseft.serve

    given = {}
    monkeypatch.setattr(sparseft.serve, "build_app", lambda model, diffs, **kwargs: given.update(diffs=diffs))
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: None)
    assert main(["serve", "--model", "m", "--diff", "a=my-org/diff-a"]) == 0
    assert given["diffs"] == [("a", str(resolve_diff("my-org/diff-a")))]
