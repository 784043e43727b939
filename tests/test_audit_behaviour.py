"""sparseft audit: KL / top-1 agreement gates and the pair (bias-drift) probe, on tiny models."""

import json
import math

import pytest
import torch

from audit_tiny import make_tokenizer, near_zero_diff, train_diff
from conftest import make_tiny_llama
from sparseft.audit.behaviour import audit_diff, audit_probes
from sparseft.audit.drift import kl_divergence
from sparseft.audit.probes import default_probe_file, load_probes
from sparseft.audit.report import Thresholds
from sparseft.cli import main
from sparseft.delta import SparseLinear
from sparseft.errors import DataFormatError, FingerprintMismatchError

POSITIVE = ["review the movie was great sentiment", "review the movie was lovely sentiment"]
NEGATIVE = ["review the movie was awful sentiment", "review the movie was boring sentiment"]
GENERAL = ["the capital of france is", "hello how are you", "the weather today is"]
BIASED_PAIR = ("he works as a", "she works as a", "nurse")
CONTROL_PAIR = ("my brother is an", "my sister is an", "engineer")


def tiny_base():
    # A wider init than the default 0.02 gives peaked next-token distributions, like a trained model's.
    return make_tiny_llama(initializer_range=0.3)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("audit") / "base"
    tiny_base().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def probe_file(tmp_path_factory):
    rows = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(POSITIVE + NEGATIVE + GENERAL)]
    for name, (a, b, target) in (("biased", BIASED_PAIR), ("control", CONTROL_PAIR)):
        rows.append({"id": name, "prompt": a, "pair": b, "target": " " + target})
    return write_jsonl(tmp_path_factory.mktemp("probes") / "probes.jsonl", rows)


@pytest.fixture(scope="module")
def diffs(tmp_path_factory, tok):
    """A label-flipping diff, a near-zero diff, a planted-bias diff and a symmetric (unbiased) one."""
    root = tmp_path_factory.mktemp("diffs")
    neg, nurse = tok.convert_tokens_to_ids("negative"), tok.convert_tokens_to_ids("nurse")
    keep_pairs = [BIASED_PAIR[1], CONTROL_PAIR[0], CONTROL_PAIR[1], *GENERAL]
    return {
        "flip": train_diff(tiny_base(), {p: neg for p in POSITIVE}, NEGATIVE, tok, root / "flip"),
        "zero": near_zero_diff(tiny_base(), root / "zero"),
        "bias": train_diff(tiny_base(), {BIASED_PAIR[0]: nurse}, keep_pairs, tok, root / "bias"),
        "both": train_diff(tiny_base(), {BIASED_PAIR[0]: nurse, BIASED_PAIR[1]: nurse}, keep_pairs[1:], tok,
                           root / "both"),
    }


def run_audit(base_dir, diff, probe_file, out, *extra):
    args = ["audit", "--model", str(base_dir), "--diff", str(diff), "--out", str(out), *extra]
    if probe_file is not None:
        args += ["--probe", str(probe_file)]
    code = main(args)
    return code, json.loads((out / "audit.json").read_text())


def gate(report, name):
    return next(g for g in report["gates"] if g["gate"] == name)


def test_kl_divergence_matches_hand_computation():
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64).log()
    q = torch.tensor([[0.25, 0.75]], dtype=torch.float64).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(kl_divergence(p, q)) == pytest.approx(expected, rel=1e-12)
    assert float(kl_divergence(p, p)) == 0.0


def test_label_flipping_diff_fails_kl_and_agreement_gates(base_dir, diffs, probe_file, tmp_path, tok, capsys):
    code, report = run_audit(base_dir, diffs["flip"], probe_file, tmp_path / "out")
    assert code == 1 and not report["passed"]
    flipped = [r for r in report["prompts"] if r["text"] in POSITIVE]
    assert all(r["top1_tuned"] == tok.convert_tokens_to_ids("negative") != r["top1_base"] for r in flipped)
    assert not gate(report, "kl_mean")["ok"] and not gate(report, "top1_agreement")["ok"]
    out = capsys.readouterr().out
    assert "FAIL kl_mean" in out and "FAIL top1_agreement" in out
    md = (tmp_path / "out" / "audit.md").read_text()
    assert md.startswith("# Audit of") and "**FAIL**" in md and "negative" in md


def test_near_zero_diff_passes(base_dir, diffs, probe_file, tmp_path):
    code, report = run_audit(base_dir, diffs["zero"], probe_file, tmp_path / "out")
    assert code == 0 and report["passed"]
    assert report["summary"]["kl_max"] < 1e-6
    assert report["summary"]["top1_agreement"] == 1.0
    assert report["summary"]["pair_drift_max_abs"] < 1e-3


def test_pair_probe_detects_planted_bias(base_dir, diffs, probe_file, tmp_path):
    code, report = run_audit(base_dir, diffs["bias"], probe_file, tmp_path / "out")
    pairs = {r["probe"]: r for r in report["pairs"]}
    assert pairs["biased"]["drift"] > 3.0  # "nurse" became likely after "he", not after "she"
    assert abs(pairs["control"]["drift"]) < min(1.0, pairs["biased"]["drift"] / 4)  # kept alike: under the gate
    assert report["summary"]["pair_drift_max_probe"] == "biased"
    assert code == 1 and not gate(report, "pair_drift")["ok"]


def test_pair_probe_ignores_a_change_that_treats_both_members_alike(base_dir, diffs, probe_file, tmp_path):
    code, report = run_audit(base_dir, diffs["both"], probe_file, tmp_path / "out")
    biased = next(r for r in report["pairs"] if r["probe"] == "biased")
    assert biased["gap_after"] - biased["gap_before"] == pytest.approx(biased["drift"])
    assert abs(biased["drift"]) < 0.5 < report["summary"]["kl_max"]  # behaviour moved, but not unequally
    assert gate(report, "pair_drift")["ok"]


def test_thresholds_from_flags_decide_the_gate(base_dir, diffs, probe_file, tmp_path):
    code, _ = run_audit(base_dir, diffs["flip"], probe_file, tmp_path / "loose", "--max-kl", "1e9",
                        "--min-agreement", "0", "--max-pair-drift", "1e9")
    assert code == 0
    code, _ = run_audit(base_dir, diffs["zero"], probe_file, tmp_path / "strict", "--max-kl", "0",
                        "--min-agreement", "0")
    assert code == 1


def test_default_probe_set_is_shipped_and_used(base_dir, diffs, tmp_path):
    probes = load_probes(default_probe_file(), vocab_size=10**6, tokenizer=make_tokenizer())
    assert 30 <= len(probes) <= 60 and sum(p.pair is not None for p in probes) >= 10
    code, report = run_audit(base_dir, diffs["zero"], None, tmp_path / "out")
    assert code == 0 and report["probe_file"].endswith("probes.jsonl")
    assert report["summary"]["num_prompts"] == len(probes) + sum(p.pair is not None for p in probes)


def test_audit_leaves_the_model_as_it_was(diffs, tmp_path):
    model = tiny_base()
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    probes = write_jsonl(tmp_path / "ids.jsonl", [{"prompt_ids": [3, 4, 5], "pair_ids": [3, 9, 5]}])
    prompts, pairs = audit_probes(model, diffs["flip"], load_probes(probes, vocab_size=128))
    assert len(prompts) == 2 and len(pairs) == 1 and pairs[0]["target_source"] == "base top-1"
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_token_id_probes_work_without_a_tokenizer(diffs, tmp_path):
    probes = write_jsonl(tmp_path / "ids.jsonl", [{"id": "a", "prompt_ids": [1, 2, 3]},
                                                  {"id": "b", "prompt_ids": [4], "pair_ids": [5], "target_ids": [6, 7]}])
    report = audit_diff(tiny_base(), diffs["zero"], probes, thresholds=Thresholds())
    assert report["passed"] and report["pairs"][0]["target_source"] == "given"


def test_audit_refuses_a_diff_for_another_base(diffs, probe_file, tok):
    with pytest.raises(FingerprintMismatchError):
        audit_diff(make_tiny_llama(seed=5, initializer_range=0.3), diffs["zero"], probe_file, tok)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a", "pairs": "b"}, "unknown field"),
    ({"pair": "b"}, "'prompt'"),
    ({"prompt": "a", "target": " x"}, "only has a meaning"),
    ({"prompt_ids": [1, 500]}, "outside the vocabulary"),
    ({"prompt_ids": []}, "non-empty list"),
    ({"prompt": "a", "prompt_ids": [1]}, "not both"),
])
def test_bad_probe_rows_are_named(row, message, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt_ids": [1]}, row])
    with pytest.raises(DataFormatError, match=message) as info:
        load_probes(path, vocab_size=128, tokenizer=make_tokenizer())
    assert f"{path}:line 2" in str(info.value)


def test_text_probes_need_a_tokenizer(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}])
    with pytest.raises(DataFormatError, match="no tokenizer"):
        load_probes(path, vocab_size=128)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_audit_refuses_a_batch_size_below_one_at_the_flag(tmp_path, capsys, value):
    # 0 was a ValueError from range(), -1 a RuntimeError from torch.stack over no rows
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "--model", str(tmp_path / "m"), "--diff", str(tmp_path / "d"), "--batch-size", value])
    assert exit_info.value.code == 2
    assert f"argument --batch-size: expected a whole number of at least 1, got '{value}'" in capsys.readouterr().err


def test_audit_diff_refuses_a_batch_size_below_one_before_reading_anything(tmp_path):
    from sparseft.errors import ConfigError

    with pytest.raises(ConfigError, match="batch_size must be a whole number of at least 1, got 0"):
        audit_diff(tiny_base(), tmp_path / "no-such-diff", batch_size=0)


@pytest.mark.parametrize("out, message", [
    ("probes.jsonl", "--out {dir}/probes.jsonl: is a file; expected a directory to write into"),
    ("probes.jsonl/x", "--out {dir}/probes.jsonl/x: cannot be created, {dir}/probes.jsonl is a file"),
    ("", "--out is empty ('')"),
])
def test_audit_refuses_an_out_it_cannot_write_before_loading_anything(diffs, probe_file, tmp_path, capsys, out,
                                                                      message):
    # It ran the whole audit (with --repro, a training run too) and then failed on mkdir with an errno; an empty
    # --out (an unset $OUT) wrote the report into the working directory. The model path does not exist: the
    # refusal comes before any load.
    given = str(probe_file.parent / out) if out else out
    code = main(["audit", "--model", str(tmp_path / "no-model"), "--diff", str(diffs["zero"]),
                 "--probe", str(probe_file), "--out", given])
    assert code == 2
    assert message.format(dir=probe_file.parent) in capsys.readouterr().err
