"""lm-evaluation-harness scores a diff: the registered ``sparseft`` model type and the exported PEFT adapter.

The harness runs offline on a task YAML over a local JSON Lines file; its log-likelihoods and accuracy
must equal sparseft's own label-likelihood scoring (``score_completions``) of the same prompts.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval", reason="needs the lmeval extra: pip install 'sparseft[lmeval]'")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import sparseft.lmeval  # noqa: E402,F401  (registers the "sparseft" model type)
from sparseft import SparseConfig, SparseModel, get_sparse_model  # noqa: E402
from sparseft.diffio import read_diff  # noqa: E402
from sparseft.errors import ConfigError  # noqa: E402
from sparseft.peft_interop import export_shira  # noqa: E402
from sparseft.tasks.inference import score_completions  # noqa: E402

from conftest import make_tiny_llama, make_tiny_tokenizer  # noqa: E402

SENTENCES = [
    ("a gripping , funny film", 1), ("dull and far too long", 0), ("the cast is wonderful", 1),
    ("a mess from start to end", 0), ("warm , clever and moving", 1), ("i want my two hours back", 0),
]
CHOICES = ["negative", "positive"]
PROMPT = "Review: {sentence}\nSentiment:"
TASK_YAML = """\
task: tiny_sst2
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "Review: {{{{sentence}}}}\\nSentiment:"
doc_to_target: label
doc_to_choice: {choices}
metric_list:
  - metric: acc
"""


@pytest.fixture
def local_task(tmp_path):
    """A harness task over a local SST-2-like JSON Lines file (no download)."""
    data = tmp_path / "tiny_sst2.jsonl"
    data.write_text("".join(json.dumps({"sentence": s, "label": y}) + "\n" for s, y in SENTENCES))
    tasks = tmp_path / "lm_eval_tasks"
    tasks.mkdir()
    (tasks / "tiny_sst2.yaml").write_text(TASK_YAML.format(data=data, choices=json.dumps(CHOICES)))
    return TaskManager(include_path=str(tasks), include_defaults=False)  # skip indexing the built-in tasks


def tiny_base():
    # Vocabulary = the tokenizer's length: the harness's peft path resizes the embeddings to the
    # tokenizer otherwise, which changes every log-likelihood (a softmax over fewer tokens).
    return make_tiny_llama(vocab_size=len(make_tiny_tokenizer()))


@pytest.fixture
def base_dir(tmp_path):
    path = tmp_path / "base"
    tiny_base().save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def diff_dir(tmp_path):
    """A diff of the tiny base with values large enough to move the label likelihoods."""
    model = get_sparse_model(tiny_base(), SparseConfig(density=0.2, scorer="random", seed=0, value_dtype="float32"))
    with torch.no_grad():
        for p in model.sparse_parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return model.save_pretrained(tmp_path / "diff")


def harness(model: str, model_args: str, task_manager) -> tuple[float, torch.Tensor]:
    """Accuracy and the ``[examples, choices]`` log-likelihoods the harness computed."""
    out = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=["tiny_sst2"], task_manager=task_manager,
        device="cpu", batch_size=4, log_samples=True,
    )
    samples = sorted(out["samples"]["tiny_sst2"], key=lambda s: s["doc_id"])
    lls = torch.tensor([[resp[0] for resp in s["filtered_resps"]] for s in samples])
    return out["results"]["tiny_sst2"]["acc,none"], lls


def by_hand(model, tokenizer) -> tuple[float, torch.Tensor]:
    """sparseft's own scoring: Σ log p(" label" | prompt) for each label, argmax against the gold label."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [encode(PROMPT.format(sentence=s)) for s, _ in SENTENCES]
    lls = score_completions(model, prompts, [encode(" " + c) for c in CHOICES], pad_id=tokenizer.pad_token_id)
    gold = torch.tensor([y for _, y in SENTENCES])
    return (lls.argmax(-1) == gold).float().mean().item(), lls


def test_harness_scores_a_diff_as_sparseft_does(base_dir, diff_dir, local_task, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    sparse = SparseModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), diff_dir)
    sparse.merge()
    expected_acc, expected = by_hand(sparse.base_model, tokenizer)
    _, base_lls = by_hand(AutoModelForCausalLM.from_pretrained(base_dir), tokenizer)
    assert not torch.allclose(expected, base_lls, atol=1e-2)  # the diff matters, so merging it is checked

    acc, lls = harness("sparseft", f"pretrained={base_dir},diff={diff_dir}", local_task)
    torch.testing.assert_close(lls, expected, atol=1e-4, rtol=1e-4)
    assert acc == pytest.approx(expected_acc)

    adapter = tmp_path / "shira"
    export_shira(read_diff(diff_dir), adapter)
    acc, lls = harness("hf", f"pretrained={base_dir},peft={adapter}", local_task)
    torch.testing.assert_close(lls, expected, atol=1e-4, rtol=1e-4)
    assert acc == pytest.approx(expected_acc)


def test_harness_scores_a_diff_over_a_quantized_base_unmerged_and_refuses_it_without_quantize(base_dir, local_task,
                                                                                              tmp_path):
    pytest.importorskip("torchao")
    from sparseft.errors import FingerprintMismatchError
    from sparseft.quantize import quantize_base, quantize_sparse_model

    config = SparseConfig(density=0.2, scorer="random", seed=0, value_dtype="float32")
    trained = quantize_sparse_model(get_sparse_model(tiny_base(), config), "int8")  # fingerprinted over the codes
    with torch.no_grad():
        for p in trained.sparse_parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    diff = trained.save_pretrained(tmp_path / "q8")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    sparse = SparseModel.from_pretrained(quantize_base(AutoModelForCausalLM.from_pretrained(base_dir), "int8"), diff)
    expected_acc, expected = by_hand(sparse.base_model, tokenizer)  # unmerged over the int8 base
    _, base_lls = by_hand(quantize_base(AutoModelForCausalLM.from_pretrained(base_dir), "int8"), tokenizer)
    assert not torch.allclose(expected, base_lls, atol=1e-2)  # the diff matters, so attaching it is checked

    acc, lls = harness("sparseft", f"pretrained={base_dir},diff={diff},quantize=int8", local_task)
    torch.testing.assert_close(lls, expected, atol=1e-4, rtol=1e-4)
    assert acc == pytest.approx(expected_acc)

    with pytest.raises(FingerprintMismatchError, match=r"load it with --quantize int8.*model_args"):
        harness("sparseft", f"pretrained={base_dir},diff={diff}", local_task)


def test_a_refusal_for_another_base_gets_no_model_args_hint(diff_dir):
    """The lm_eval hint is for refusals that name flags to pass; no flag turns another base into the right one."""
    from sparseft.errors import FingerprintMismatchError
    from sparseft.lmeval import attach

    other = make_tiny_llama(seed=7, vocab_size=len(make_tiny_tokenizer()))
    with pytest.raises(FingerprintMismatchError, match="different base model") as refused:
        attach(other, diff_dir)
    assert "model_args" not in str(refused.value)


def test_a_diff_model_arg_read_as_a_number_is_refused_by_name_before_loading(base_dir):
    # lm_eval turns diff=123 into an int; it reached Path(123) as a TypeError after the base had loaded.
    from sparseft.lmeval import SparseFTLM

    with pytest.raises(ConfigError, match=r"model_args diff=123: lm_eval read the value as type int.*\./NAME"):
        SparseFTLM(pretrained=str(base_dir), diff=123, device="cpu")


def test_no_diff_model_arg_scores_the_base_and_says_so(base_dir, diff_dir, caplog):
    from sparseft.lmeval import SparseFTLM

    warning = "model_args has no diff=: scoring the base model alone"
    with caplog.at_level("WARNING", logger="sparseft.lmeval"):
        SparseFTLM(pretrained=str(base_dir), device="cpu")
    assert any(m.endswith(warning) for m in caplog.messages)
    caplog.clear()
    with caplog.at_level("WARNING", logger="sparseft.lmeval"):
        SparseFTLM(pretrained=str(base_dir), diff=str(diff_dir), device="cpu")
    assert not any(warning in m for m in caplog.messages)


def test_the_command_line_reports_a_sparseft_error_in_one_line(base_dir, local_task, tmp_path, monkeypatch, capsys):
    # A missing diff (or one of another base) was a traceback through lm_eval; now one error line and status 2.
    from sparseft.lmeval.__main__ import main

    missing = tmp_path / "no-such-diff"
    monkeypatch.setattr("sys.argv", [
        "lm_eval", "--model", "sparseft", "--model_args", f"pretrained={base_dir},diff={missing}",
        "--tasks", "tiny_sst2", "--include_path", str(tmp_path / "lm_eval_tasks"), "--device", "cpu",
    ])
    assert main() == 2
    assert capsys.readouterr().err.strip().endswith(f"sparseft.lmeval: error: {missing}: no such diff directory")
