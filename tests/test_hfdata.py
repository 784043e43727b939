"""Hugging Face dataset names as data sources, loaded offline from a datasets cache built in tmp_path.

The cache is written by a real ``datasets`` builder (parquet, as the Hub serves data) in the layout
``load_dataset`` falls back to offline: ``CACHE/NAME/CONFIG/VERSION/HASH/{dataset_info.json, NAME-SPLIT.arrow}``.
"""

from __future__ import annotations

import json

import datasets
import pytest
from datasets.packaged_modules.parquet.parquet import Parquet

from sparseft.errors import DataFormatError
from sparseft.hfdata import DatasetSpec, dataset_rows, dataset_sha256, parse_dataset_spec
from sparseft.tasks import get_task
from sparseft.tasks.qa import read_squad_rows
from sparseft.training.data import data_sha256, load_rows


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty, offline datasets cache; returns ``put(name, config, split, rows)`` that fills it."""
    cache = tmp_path / "hf-datasets-cache"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.chdir(tmp_path)  # no local directory of a dataset's name shadows the cache

    def put(name: str, config: str, split: str, rows: dict[str, list]) -> None:
        source = tmp_path / f"{name}-{config}-{split}.parquet"
        datasets.Dataset.from_dict(rows).to_parquet(str(source))
        builder = Parquet(
            cache_dir=str(cache), dataset_name=name, config_name=config, config_id=config,
            data_files={split: str(source)}, hash="0" * 16,
        )
        builder.download_and_prepare()

    return put


def test_spec_parsing_and_local_files_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_dataset_spec("hf:glue/sst2:validation[:100]") == DatasetSpec("glue/sst2", None, "validation[:100]")
    assert parse_dataset_spec("glue:sst2:validation") == DatasetSpec("glue", "sst2", "validation")
    assert parse_dataset_spec("nyu-mll/glue/sst2:train").candidates() == [("nyu-mll/glue", "sst2")]
    assert DatasetSpec("glue/sst2", None, "x").candidates() == [("glue/sst2", None), ("glue", "sst2")]
    assert parse_dataset_spec("data/train.jsonl") is None  # no split: a path
    (tmp_path / "glue").mkdir()
    (tmp_path / "glue" / "sst2:validation").write_text("")
    assert parse_dataset_spec("glue/sst2:validation") is None  # an existing file is the file
    assert parse_dataset_spec("hf:glue/sst2:validation") is not None  # unless hf: says otherwise
    with pytest.raises(DataFormatError, match="hf:NAME"):
        parse_dataset_spec("hf:glue")


def test_sst2_task_reads_glue_sst2_from_the_offline_cache(hf_cache):
    hf_cache("glue", "sst2", "validation", {"sentence": ["a fine film ", "dull "], "label": [1, 0], "idx": [0, 1]})
    records = get_task("sst2").load("glue/sst2:validation")
    assert records == [{"text": "a fine film", "label": 1}, {"text": "dull", "label": 0}]
    assert get_task("sst2").load("hf:glue:sst2:validation[1:]") == records[1:]


def test_squad_rows_split_by_article_like_the_json_file(hf_cache):
    answers = lambda *t: {"text": list(t), "answer_start": [0] * len(t)}  # noqa: E731
    hf_cache("squad", "plain_text", "validation", {
        "id": ["q1", "q2", "q3"], "title": ["A", "A", "B"], "context": ["ctx a", "ctx a", "ctx b"],
        "question": ["q one?", "q two?", "q three?"], "answers": [answers("x", "y"), answers("z"), answers("w")],
    })
    assert [r["id"] for r in get_task("squad").load("hf:squad:validation")] == ["q1", "q2", "q3"]
    with pytest.raises(DataFormatError, match="no questions"):  # articles 40 on: none of two
        get_task("squad-heldout").load("hf:squad:validation")
    assert [r["id"] for r in read_squad_rows("squad:validation", slice(1, None))] == ["q3"]
    assert read_squad_rows("squad:validation")[0]["answers"] == ["x", "y"]


def test_samsum_and_training_rows_and_their_hash(hf_cache):
    hf_cache("samsum", "default", "test", {"id": ["1"], "dialogue": ["Ann: hi\r\nBob: hey"], "summary": ["Greetings. "]})
    assert get_task("samsum").load("hf:samsum:test") == [{"dialogue": "Ann: hi\nBob: hey", "summary": "Greetings."}]
    hf_cache("tickets", "default", "train", {"prompt": ["Q: 1+1?"], "completion": [" 2"]})
    assert load_rows("hf:tickets:train") == [{"prompt": "Q: 1+1?", "completion": " 2"}]
    assert data_sha256("hf:tickets:train") == dataset_sha256("tickets:train")
    hf_cache("tickets", "other", "train", {"prompt": ["Q: 1+1?"], "completion": [" 3"]})
    assert data_sha256("hf:tickets:other:train") != data_sha256("hf:tickets:default:train")


def test_a_revision_pins_the_dataset_commit_and_stays_in_the_name(monkeypatch):
    assert parse_dataset_spec("hf:rajpurkar/squad@7b6d24c:validation[:50]") == \
        DatasetSpec("rajpurkar/squad", None, "validation[:50]", revision="7b6d24c")
    spec = parse_dataset_spec("hf:glue@v2.0:sst2:train")
    assert (spec.name, spec.revision, spec.config, str(spec)) == ("glue", "v2.0", "sst2", "hf:glue@v2.0:sst2:train")
    with pytest.raises(DataFormatError, match=r"hf:NAME\[@REVISION\]"):
        parse_dataset_spec("hf:glue@:train")  # an empty revision is a typo, not the default branch

    asked = []

    def load_dataset(path, config, split, revision):
        asked.append((path, config, split, revision))
        return [{"sentence": "fine .", "label": 1}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert [row for _, row in dataset_rows("hf:glue@v2.0:sst2:train")] == [{"sentence": "fine .", "label": 1}]
    assert [where for where, _ in dataset_rows("hf:glue/sst2:train")] == ["hf:glue/sst2:train:row 0"]
    assert asked == [("glue", "sst2", "train", "v2.0"), ("glue/sst2", None, "train", None)]


def test_a_dataset_missing_from_the_offline_cache_is_a_clear_error(hf_cache):
    with pytest.raises(DataFormatError, match=r"hf:glue/cola:validation.*offline.*load_dataset\('glue', 'cola'"):
        get_task("sst2").load("hf:glue/cola:validation")
    hf_cache("glue", "sst2", "validation", {"sentence": ["ok"], "label": [7]})
    with pytest.raises(DataFormatError, match=r"row 0: field 'label' must be an integer 0\.\.1, got 7"):
        get_task("sst2").load("glue/sst2:validation")


def test_a_bench_config_takes_hub_names_as_they_are():
    import yaml

    from sparseft.bench.config import parse_bench_config
    from test_bench import TINY

    raw = {**yaml.safe_load(TINY.read_text()), "train_data": "hf:glue/sst2:train", "eval_data": "hf:glue/sst2:validation"}
    cfg = parse_bench_config(raw, base_dir=TINY.parent)
    assert (cfg.train_data, cfg.eval_data) == ("hf:glue/sst2:train", "hf:glue/sst2:validation")


def test_training_takes_a_hub_dataset_name(hf_cache, tiny_model_with_tokenizer_dir, tmp_path):
    from sparseft.training import TrainConfig, run_training

    rows = {"prompt": [f"Q: {i}+1?" for i in range(8)], "completion": [f" {i + 1}" for i in range(8)]}
    hf_cache("sums", "default", "train", rows)
    cfg = TrainConfig.from_dict(dict(model=str(tiny_model_with_tokenizer_dir), data="hf:sums:train",
                                     out=str(tmp_path / "run"), steps=2, batch_size=4, density=0.05, scorer="random"))
    result = run_training(cfg)
    recorded = json.loads((result.out / "sparse_config.json").read_text())["provenance"]["data_sha256"]
    assert recorded == dataset_sha256("sums:train")
