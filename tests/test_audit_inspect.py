"""sparseft inspect: per-layer/type/family statistics, robust outliers, heat map, provenance."""

import json

import pytest
import torch

from conftest import make_tiny_llama
from sparseft import SparseConfig, get_sparse_model
from sparseft.audit import inspect_diff
from sparseft.audit.heatmap import heat_grid
from sparseft.audit.inspection import layer_index, module_family, outlier_threshold
from sparseft.cli import main

PLANTED = "model.layers.1.mlp.down_proj"
PROVENANCE = {"data": {"train.jsonl": {"sha256": "ab" * 32}}, "train_config": {"lr": 1e-3, "steps": 20},
              "selection_scores": {"scorer": "fisher", "kept_min": 1.5e-7}}


@pytest.fixture
def diff(tmp_path):
    model = get_sparse_model(make_tiny_llama(), SparseConfig(density=0.05, value_dtype="float32"))
    with torch.no_grad():
        for layer in model.sparse_layers().values():
            layer.values.normal_(0, 1e-2)
        model.sparse_layers()[PLANTED].values[4] = -0.8  # one hostile edit in a quiet diff
    path = model.save_pretrained(tmp_path / "diff", provenance=PROVENANCE)
    return model, path


def test_names_map_to_layers_and_families():
    assert (layer_index("model.layers.10.mlp.down_proj"), module_family("model.layers.10.mlp.down_proj")) == (10, "mlp")
    assert (layer_index("transformer.h.3.attn.c_attn"), module_family("transformer.h.3.attn.c_attn")) == (3, "attention")
    assert (layer_index("lm_head"), module_family("lm_head")) == (None, "other")


def test_outlier_threshold_is_robust():
    values = torch.cat([torch.full((99,), 1.0), torch.tensor([1000.0])])
    assert outlier_threshold(values) == 1.0  # MAD 0: the one huge value cannot raise the bar
    spread = torch.arange(1.0, 102.0)
    assert outlier_threshold(spread) == pytest.approx(51 + 10 * 25)


def test_groups_counts_and_planted_outlier(diff):
    model, path = diff
    report = inspect_diff(path)
    layers = model.sparse_layers()
    total = sum(layer.k for layer in layers.values())
    attn = sum(layer.k for name, layer in layers.items() if ".self_attn." in name)
    assert report["families"]["attention"]["k"] == attn and report["families"]["mlp"]["k"] == total - attn
    assert report["families"]["attention"]["share"] == pytest.approx(attn / total)
    assert list(report["types"]) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert list(report["layers"]) == ["0", "1"] and sum(g["k"] for g in report["layers"].values()) == total
    assert report["modules"][PLANTED]["max_abs"] == pytest.approx(0.8)
    assert report["outliers"]["count"] == 1
    top = report["outliers"]["top"][0]
    flat = int(layers[PLANTED].indices[4])
    assert (top["module"], top["row"], top["col"]) == (PLANTED, flat // 64, flat % 64)
    assert report["layers"]["1"]["outliers"] == 1 and report["layers"]["0"]["outliers"] == 0


def test_text_shows_groups_outlier_and_provenance(diff, capsys):
    _, path = diff
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{PLANTED}[" in out and "-0.8" in out
    assert "attention" in out and "down_proj" in out
    provenance = out[out.index("provenance"):]
    assert f"train.jsonl.sha256={'ab' * 32}" in provenance
    assert "lr=0.001" in provenance and "steps=20" in provenance and "scorer=fisher" in provenance
    assert "torch=" in provenance and "transformers=" in provenance


def test_plot_writes_png_heat_map(diff, tmp_path, capsys):
    _, path = diff
    png = tmp_path / "plots" / "heat.png"
    assert main(["inspect", str(path), "--json", "--plot", str(png)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    layers, types, grid = heat_grid(report, "density")
    assert layers == ["0", "1"] and len(types) == 7
    m = report["modules"][PLANTED]
    assert grid[1][types.index("down_proj")] == pytest.approx(m["density"])
    _, _, means = heat_grid(report, "mean_abs")
    assert means[1][types.index("down_proj")] == pytest.approx(m["mean_abs"])


def test_plot_refuses_an_unsupported_extension_or_unwritable_path_at_the_flag(tmp_path, capsys):
    # was: a ValueError from PIL ("Format 'txt' is not supported") after the report was printed
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = [(tmp_path / "out.txt", "a heat map is written as .png, .pdf, .svg; got '.txt'"),
             (tmp_path / "out", "a heat map is written as .png, .pdf, .svg; got no extension"),
             (a_file / "x.png", f"cannot write there, {a_file} is a file, not a folder")]
    for plot, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["inspect", str(tmp_path / "no-such-diff"), "--plot", str(plot)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --plot: {plot}: {message}" in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.*"))


def test_plot_writes_svg_and_plot_heatmap_refuses_a_bad_name(diff, tmp_path):
    from sparseft.audit.heatmap import plot_heatmap
    from sparseft.errors import ConfigError

    _, path = diff
    report = inspect_diff(path)
    assert plot_heatmap(report, tmp_path / "heat.SVG").read_text().lstrip().startswith("<?xml")
    with pytest.raises(ConfigError, match=r"heat\.jpeg: a heat map is written as \.png, \.pdf, \.svg"):
        plot_heatmap(report, tmp_path / "heat.jpeg")
