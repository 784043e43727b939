"""Serving a diff trained over a weight-only quantized base: the server loads the base quantized
(``--quantize``), runs every diff unmerged over the codes, and answers as ``SparseModel`` does offline
over the same quantized base; a diff of another base (plain, or another scheme) is refused as before."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

pytest.importorskip("torchao")

from conftest import make_tiny_llama  # noqa: E402
from serve_fixtures import make_diff, make_tokenizer, save_base  # noqa: E402
from sparseft import SparseConfig, SparseModel, get_sparse_model  # noqa: E402
from sparseft.cli import main  # noqa: E402
from sparseft.errors import ConfigError, FingerprintMismatchError  # noqa: E402
from sparseft.quantize import quantize_base, quantize_sparse_model  # noqa: E402
from sparseft.serve import Engine, ServeLimits, build_app  # noqa: E402

BASE = "tiny-base"
MAX_TOKENS = 10
PROMPTS = ["w10 w20 w30", "w40 w41 w42 w43", "w100 w7"]
LIMITS = ServeLimits(max_body_bytes=4096, max_tokens=32)


def make_quantized_diff(path, scheme: str, seed: int = 1, base_seed: int = 0):
    """A diff over make_tiny_llama(base_seed) quantized with ``scheme``, its fingerprint taken over the codes
    (as ``sparseft train --quantize`` records it), with values large enough to change the greedy output."""
    config = SparseConfig(density=0.2, scorer="random", seed=seed, value_dtype="float32")
    sparse = quantize_sparse_model(get_sparse_model(make_tiny_llama(base_seed), config), scheme)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for values in sparse.sparse_parameters():
            values.copy_(torch.randn(values.shape, generator=gen) * 0.3)
    return sparse.save_pretrained(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-quantized")
    return {"root": root, "model": save_base(root / BASE),
            **{scheme: make_quantized_diff(root / scheme, scheme) for scheme in ("int8", "nf4", "q4_1")}}


def offline(model_dir, scheme: str, diff_dir, prompt: str) -> str:
    """Greedy text of ``SparseModel`` unmerged over the quantized base (or the quantized base alone)."""
    model = quantize_base(make_tiny_llama(), scheme)
    if diff_dir is not None:
        model = SparseModel.from_pretrained(model, diff_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # the one the server reads
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                             do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def complete(client, model: str, prompt: str) -> str:
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.parametrize("scheme, strategy", [("int8", "auto"), ("nf4", "mixed"), ("nf4", "auto"), ("q4_1", "mixed")])
def test_a_diff_over_a_quantized_base_is_served_as_sparse_model_runs_it_offline(files, scheme, strategy):
    app = build_app(str(files["model"]), [("q", str(files[scheme]))], served_name=BASE, limits=LIMITS,
                    strategy=strategy, quantize=scheme)
    with TestClient(app) as client:
        served = {(name, p): complete(client, name, p) for name in (BASE, "q") for p in PROMPTS}
        engine = app.state.serve.engine
        assert engine.merged is None and engine.swaps == 0  # never merged into the codes, even by `auto`
    for prompt in PROMPTS:
        assert served["q", prompt] == offline(files["model"], scheme, files[scheme], prompt)
        assert served[BASE, prompt] == offline(files["model"], scheme, None, prompt)
    assert any(served["q", p] != served[BASE, p] for p in PROMPTS)  # the diff changes the output: it was applied


def test_without_quantize_the_diff_is_refused_naming_the_flag(files):
    with pytest.raises(FingerprintMismatchError, match="load it with --quantize int8"):
        build_app(str(files["model"]), [("q", str(files["int8"]))], served_name=BASE, limits=LIMITS)


def test_a_quantized_server_refuses_diffs_of_another_base_at_run_time(files, tmp_path):
    plain = make_diff(tmp_path / "plain", seed=1)  # over the full-precision base
    foreign = make_quantized_diff(tmp_path / "foreign", "int8", base_seed=7)  # over another int8 base
    app = build_app(str(files["model"]), served_name=BASE, limits=LIMITS, quantize="int8")
    with TestClient(app) as client:
        for path, words in ((plain, "not quantized"), (files["nf4"], "NF4Tensor"),
                            (foreign, "made for a different base")):
            r = client.post("/admin/diffs", json={"name": "d", "path": str(path)})
            assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
        assert client.get("/admin/diffs").json()["diffs"] == []  # nothing was loaded


def test_merge_on_switch_over_a_quantized_base_is_refused_before_loading_it(capsys, tmp_path):
    missing = tmp_path / "no-such-model"  # loading it would fail: the refusal must come first
    assert main(["serve", "--model", str(missing), "--quantize", "nf4", "--strategy", "merged"]) == 2
    err = capsys.readouterr().err
    assert "strategy 'merged'" in err and "'auto' or 'mixed'" in err and "no-such-model" not in err
    with pytest.raises(ConfigError, match="strategy 'merged'"):  # the engine refuses such a model too
        Engine(quantize_base(make_tiny_llama(), "int8"), make_tokenizer())


def test_the_ray_app_builder_passes_quantize_to_the_replicas(monkeypatch, tmp_path):
    import sparseft.serve.ray_app as ray_app

    built: dict = {}
    monkeypatch.setattr(ray_app, "build_ray_app", lambda model, source, **kwargs: built.update(kwargs) or "app")
    ray_app.app_builder({"model": "m", "diff_dir": str(tmp_path), "quantize": "nf4", "strategy": "mixed"})
    assert built["engine"].quantize == "nf4" and built["engine"].as_kwargs()["quantize"] == "nf4"
    ray_app.app_builder({"model": "m", "diff_dir": str(tmp_path), "quantize": "nf4",
                         "quantize_skip": "model.layers.[0,1].*, *.down_proj"})
    assert built["engine"].as_kwargs()["quantize_skip"] == ("model.layers.[0,1].*", "*.down_proj")
    with pytest.raises(ConfigError, match="quantize_skip .* it needs quantize"):
        ray_app.app_builder({"model": "m", "diff_dir": str(tmp_path), "quantize_skip": "*.down_proj"})
    with pytest.raises(ConfigError, match="strategy 'merged'"):
        ray_app.app_builder({"model": "m", "diff_dir": str(tmp_path), "quantize": "int8", "strategy": "merged"})

