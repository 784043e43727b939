"""``python -m sparseft.bench.compare``: named groups of a grid's rows, mean ± std and paired intervals."""

import json

import pytest

from sparseft.bench.compare import compare, main, markdown
from sparseft.errors import ConfigError


def row(row_id: str, seed: int, scores: list[float], status: str = "ok") -> dict:
    return {"id": row_id, "seed": seed, "status": status, "metrics": {"accuracy": sum(scores) / len(scores)},
            "per_example": {"accuracy": scores}}


def results() -> dict:
    # Group a is right on examples 0-5 for both seeds; b only on examples 0-3 and 0-1.
    return {"task": {"primary_metric": "accuracy"}, "rows": [
        row("a", 0, [1, 1, 1, 1, 1, 1, 0, 0]), row("a-s1", 1, [1, 1, 1, 1, 1, 1, 0, 0]),
        row("b", 0, [1, 1, 1, 1, 0, 0, 0, 0]), row("b-s1", 1, [1, 1, 0, 0, 0, 0, 0, 0]),
        row("broken", 0, [0] * 8, status="failed")]}


def test_groups_get_mean_std_and_the_paired_interval_of_their_seed_averaged_scores():
    summary = compare(results(), {"a": ["a", "a-s1"], "b": ["b", "b-s1"]}, [("a", "b")])
    assert summary["groups"]["a"]["mean"] == pytest.approx(0.75) and summary["groups"]["a"]["std"] == 0
    assert summary["groups"]["b"]["mean"] == pytest.approx(0.375)
    assert summary["groups"]["b"]["std"] == pytest.approx(0.1767767, abs=1e-6)
    interval = summary["pairs"]["a:b"]
    assert interval["mean"] == pytest.approx(0.375) and interval["examples"] == 8  # per example: 0,0,.5,.5,1,1,0,0
    assert 0 < interval["low"] < interval["mean"] < interval["high"] <= 0.75
    table = markdown(summary)
    assert "| a | 75.00 / 75.00 | 75.00 ± 0.00 | a, a-s1 |" in table and "| a − b | +37.50 |" in table


@pytest.mark.parametrize("groups, message", [
    ({"a": ["a", "missing"]}, "group a: no row 'missing'"),
    ({"a": ["a", "broken"]}, "group a: row 'broken' did not finish ok"),
])
def test_a_group_naming_an_absent_or_failed_row_is_refused(groups, message):
    with pytest.raises(ConfigError, match=message):
        compare(results(), groups, [])


def test_the_command_prints_the_tables_and_refuses_a_pair_it_has_no_group_for(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results()))
    assert main([str(path), "--group", "a=a,a-s1", "--group", "b=b,b-s1", "--vs", "a:b"]) == 0
    assert "| a − b | +37.50 |" in capsys.readouterr().out
    # Group names with "-" keep their names in the difference (it once split the pair at the first "-").
    assert main([str(path), "--group", "nf4-corr=a,a-s1", "--group", "nf4=b,b-s1", "--vs", "nf4-corr:nf4"]) == 0
    assert "| nf4-corr − nf4 | +37.50 |" in capsys.readouterr().out
    assert main([str(path), "--group", "a=a", "--vs", "a:c"]) == 2
    assert "--vs 'a:c': expected A:B with A and B among the groups ['a']" in capsys.readouterr().err


def test_rows_of_two_grids_that_scored_the_same_examples_pair_and_others_are_refused(tmp_path, capsys):
    rows = results()["rows"]
    (tmp_path / "old.json").write_text(json.dumps({"task": {"primary_metric": "accuracy"}, "rows": rows[:2]}))
    (tmp_path / "new.json").write_text(json.dumps({"task": {"primary_metric": "accuracy"}, "rows": rows[2:4]}))
    files = [str(tmp_path / "old.json"), str(tmp_path / "new.json")]
    assert main([*files, "--group", "a=a,a-s1", "--group", "b=b,b-s1", "--vs", "a:b"]) == 0
    assert "| a − b | +37.50 |" in capsys.readouterr().out

    other = {"task": {"primary_metric": "accuracy"}, "config": {"eval_limit": 4}, "rows": rows[2:4]}
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main([files[0], str(tmp_path / "other.json"), "--group", "a=a"]) == 2
    assert "their rows cannot be paired example by example" in capsys.readouterr().err
    assert main([files[0], files[0], "--group", "a=a"]) == 2
    assert f"row 'a' is in both {files[0]} and {files[0]}" in capsys.readouterr().err
    assert main([*files, files[0], "--group", "b=b,b-s1"]) == 0  # rows no group names may repeat (each grid's base)


def test_a_file_that_is_not_a_grids_results_is_refused(tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"rows": []}))
    assert main([str(path), "--group", "a=a"]) == 2
    assert f"{path}: not a grid's results.json: expected 'rows' and 'task.primary_metric'" in capsys.readouterr().err


def test_grids_pair_by_the_content_of_the_examples_they_scored_not_the_path(tmp_path, capsys):
    rows = [{**r, "eval_examples_sha256": "ab" * 32} for r in results()["rows"][:4]]

    def grid(name: str, data: str, members: list[dict]) -> str:
        (tmp_path / name).write_text(json.dumps({"task": {"primary_metric": "accuracy"},
                                                 "config": {"eval_data": data}, "rows": members}))
        return str(tmp_path / name)

    # The same examples read from two data roots pair; without hashes the differing paths are refused.
    old, new = grid("old.json", "/a/sst2/dev.tsv", rows[:2]), grid("new.json", "../data/sst2/dev.tsv", rows[2:])
    assert main([old, new, "--group", "a=a,a-s1", "--group", "b=b,b-s1", "--vs", "a:b"]) == 0
    unhashed = grid("unhashed.json", "../data/sst2/dev.tsv", results()["rows"][2:4])
    assert main([old, unhashed, "--group", "a=a"]) == 2
    assert "(eval task, data, limit, metric)" in capsys.readouterr().err

    # A changed file at the same path is refused, and so are groups of one grid whose rows scored different sets.
    changed = grid("changed.json", "/a/sst2/dev.tsv", [{**r, "eval_examples_sha256": "cd" * 32} for r in rows[2:]])
    assert main([old, changed, "--group", "a=a"]) == 2
    assert "(eval task, examples, limit, metric)" in capsys.readouterr().err
    mixed = {"task": {"primary_metric": "accuracy"}, "rows": rows[:2] + [{**r, "eval_examples_sha256": "cd" * 32}
                                                                          for r in rows[2:]]}
    with pytest.raises(ConfigError, match="the groups' rows scored different examples"):
        compare(mixed, {"a": ["a", "a-s1"], "b": ["b", "b-s1"]}, [("a", "b")])
