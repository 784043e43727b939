"""The closed-loop mode of the serving-strategies benchmark, on the tiny random-init shape."""

import json
import threading
import time

import pytest

from sparseft.bench import serve_strategies as bench
from sparseft.bench.serve_load import random_llama
from sparseft.errors import DataFormatError


def test_two_cells_complete_every_request_and_fill_the_json(tmp_path):
    out = tmp_path / "cells.json"
    assert bench.main(["--size", "tiny", "--diffs", "2", "--requests", "5", "--concurrency", "2",
                       "--max-tokens", "3", "--strategies", "base", "mixed", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    cells = report["cells"]
    assert [(c["strategy"], c["diffs"], c["concurrency"]) for c in cells] == [("base", 0, 2), ("mixed", 2, 2)]
    for cell in cells:
        assert (cell["completed"], cell["errors"]) == (5, 0)
        assert cell["tokens"] == 5 * 3  # EOS is off: exactly max_tokens per request
        assert cell["tokens_per_s"] > 0 and cell["seconds"] > 0
        assert 0 < cell["ttft_p50_ms"] <= cell["p50_ms"] <= cell["p99_ms"]
    assert report["config"]["entries_per_diff"] > 0 and report["config"]["lora_rank"] >= 1
    assert [(t["strategy"], t["versus"]) for t in report["targets"]] == [("mixed", "base")]
    assert report["before"]["load_average"] and report["after"]["load_average"]


def test_closed_loop_runs_each_request_once_with_at_most_c_in_flight():
    in_flight, most, seen, lock = [0], [0], [], threading.Lock()

    def run_one(i):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
            seen.append(i)
        time.sleep(0.01)
        with lock:
            in_flight[0] -= 1
        return bench.Timing(latency=0.01, ttft=0.005, tokens=1)

    timings, seconds = bench.closed_loop(run_one, requests=9, concurrency=3)
    assert sorted(seen) == list(range(9)) and most[0] == 3
    assert all(t.error is None for t in timings) and seconds > 0


def test_random_diff_has_distinct_sorted_entries_at_the_density():
    model = random_llama("tiny")
    diff = bench.random_diff(model, bench.base_prints(model), density=0.05, seed=3)
    assert len(diff.masks) == 7 * model.config.num_hidden_layers
    for name, idx in diff.masks.items():
        numel = diff.shapes[name][0] * diff.shapes[name][1]
        assert idx.numel() == round(0.05 * numel) == diff.values[name].numel()
        assert idx.unique().numel() == idx.numel() and bool((idx[1:] > idx[:-1]).all()) and int(idx[-1]) < numel
    assert diff.base_fingerprint  # made for this base: the engines accept it without allow_unverified_base


@pytest.mark.parametrize("argv", [["--size", "tiny", "--concurrency", "65"],
                                  ["--size", "tiny", "--prompt-file", "prompts.tsv"],
                                  ["--model", "smollm2-135m", "--prompt-file", "no-such-file.tsv"]])
def test_out_of_bounds_or_missing_inputs_are_refused_before_loading_anything(argv, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert "error:" in capsys.readouterr().err


def test_a_prompt_file_without_text_rows_is_refused(tmp_path):
    empty = tmp_path / "dev.tsv"
    empty.write_text("sentence\tlabel\n")
    with pytest.raises(DataFormatError, match="no text rows"):
        bench.review_instructions(empty, 4)
