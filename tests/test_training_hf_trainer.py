"""A SparseModel is a plain nn.Module whose only trainable parameters are the values, so the
Hugging Face Trainer trains it as is; save_pretrained then writes the diff."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from conftest import make_tiny_llama
from sparseft import SparseConfig, SparseModel, get_sparse_model
from sparseft.errors import ConfigError
from sparseft.training.data import collate, encode_rows


class ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def test_hf_trainer_trains_the_values_and_save_pretrained_writes_the_diff(tiny_tokenizer, tmp_path):
    examples = encode_rows([{"prompt": f"q{i}", "completion": f" a{i % 3}"} for i in range(12)], tiny_tokenizer)
    model = get_sparse_model(make_tiny_llama(), SparseConfig(density=0.1, value_dtype="float32"))
    base_weights = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if not n.endswith(".values")}
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ExampleDataset(examples),
                      data_collator=lambda rows: collate(rows, tiny_tokenizer.pad_token_id))
    assert trainer.train().global_step == 3

    optimised = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert sum(p.numel() for p in optimised) == model.num_trainable()  # the optimizer holds only the k values
    assert all(float(v.detach().abs().max()) > 0 for v in model.sparse_parameters())  # every module's values moved
    for name, p in model.base_model.named_parameters():
        if not name.endswith(".values"):
            assert torch.equal(p, base_weights[name]), name  # the base stays frozen

    ids = collate(examples[:2], tiny_tokenizer.pad_token_id)["input_ids"]
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    reloaded = SparseModel.from_pretrained(make_tiny_llama(), model.save_pretrained(tmp_path / "diff"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)


def test_sparse_trainer_reselects_the_mask_on_schedule_and_saves_the_moved_mask(tiny_tokenizer, tmp_path):
    from sparseft.training.hf import SparseTrainer
    from sparseft.training.reselect import ReselectSchedule

    examples = encode_rows([{"prompt": f"q{i}", "completion": f" a{i % 3}"} for i in range(16)], tiny_tokenizer)
    torch.manual_seed(0)
    model = get_sparse_model(make_tiny_llama(), SparseConfig(density=0.05, value_dtype="float32"))
    layers = model.sparse_layers()
    before = {n: layer.indices.clone() for n, layer in layers.items()}
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                             gradient_accumulation_steps=2, report_to=[], save_strategy="no", use_cpu=True,
                             remove_unused_columns=False, disable_tqdm=True)
    trainer = SparseTrainer(model=model, args=args, train_dataset=ExampleDataset(examples),
                            data_collator=lambda rows: collate(rows, tiny_tokenizer.pad_token_id),
                            reselect_every=2, reselect_fraction=0.5)
    trainer.train()

    # Once per due step (step 2 of 4), not once per micro-batch; half of k swapped in each module.
    assert [step for step, _ in trainer.reselected] == [2]
    schedule = ReselectSchedule(every=2, fraction=0.5, total_steps=4)
    assert trainer.reselected[0][1] == sum(schedule.count(layer.k, layer.weight.numel(), 2) for layer in layers.values())
    for name, layer in layers.items():
        assert layer.indices.numel() == before[name].numel() == layer.values.numel()  # k fixed
        assert bool((layer.indices[1:] > layer.indices[:-1]).all())  # still sorted and unique
        assert not torch.equal(layer.indices, before[name]), name
        state = trainer.optimizer.state[layer.values]
        assert state["exp_avg"].shape == layer.values.shape  # moments moved with the entries, same tensors

    ids = collate(examples[:2], tiny_tokenizer.pad_token_id)["input_ids"]
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    reloaded = SparseModel.from_pretrained(make_tiny_llama(), model.save_pretrained(tmp_path / "diff"))
    assert all(torch.equal(reloaded.sparse_layers()[n].indices, layers[n].indices) for n in layers)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)


def test_sparse_trainer_resumes_from_its_checkpoint_with_the_moved_masks(tiny_tokenizer, tmp_path):
    from sparseft.training.hf import MASKS_FILE, SparseTrainer

    examples = encode_rows([{"prompt": f"q{i}", "completion": f" a{i % 3}"} for i in range(16)], tiny_tokenizer)

    def run(resume=None):
        torch.manual_seed(0)
        model = get_sparse_model(make_tiny_llama(), SparseConfig(density=0.05, value_dtype="float32"))
        args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=4, per_device_train_batch_size=4,
                                 learning_rate=1e-2, report_to=[], save_strategy="steps", save_steps=2, use_cpu=True,
                                 seed=0, remove_unused_columns=False, disable_tqdm=True)
        trainer = SparseTrainer(model=model, args=args, train_dataset=ExampleDataset(examples),
                                data_collator=lambda rows: collate(rows, tiny_tokenizer.pad_token_id),
                                reselect_every=1, reselect_fraction=0.5)
        trainer.train(resume_from_checkpoint=resume)
        return {n: (layer.indices.clone(), layer.values.detach().clone()) for n, layer in model.sparse_layers().items()}

    uninterrupted = run()
    checkpoint = tmp_path / "hf" / "checkpoint-2"  # after the re-selection before step 1: its masks had moved
    assert (checkpoint / MASKS_FILE).is_file()
    resumed = run(resume=str(checkpoint))
    for name, (indices, values) in uninterrupted.items():
        assert torch.equal(resumed[name][0], indices) and torch.equal(resumed[name][1], values), name

    (checkpoint / MASKS_FILE).unlink()
    with pytest.raises(ConfigError, match="resumes only from checkpoints it wrote itself"):
        run(resume=str(checkpoint))


def test_sparse_trainer_refuses_bad_reselection_options(tiny_tokenizer, tmp_path):
    from sparseft.training.hf import SparseTrainer

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=1, report_to=[], use_cpu=True)
    sparse = get_sparse_model(make_tiny_llama(), SparseConfig(density=0.05))
    with pytest.raises(ConfigError, match="reselect_fraction must be in"):
        SparseTrainer(model=sparse, args=args, reselect_every=2, reselect_fraction=1.5)
    with pytest.raises(ConfigError, match="needs a SparseModel"):
        SparseTrainer(model=make_tiny_llama(), args=args, reselect_every=2)


def test_sparse_trainer_ranks_growth_over_the_steps_first_micro_batches(tiny_tokenizer, tmp_path, monkeypatch):
    import sparseft.training.hf as hf

    examples = encode_rows([{"prompt": f"q{i}", "completion": f" a{i % 3}"} for i in range(16)], tiny_tokenizer)
    ranked_over = []
    real_step = hf.reselect_step

    def counting_step(model, optimizer, schedule, step, loss_of, distributed):
        ranked_over.append(len(loss_of))
        return real_step(model, optimizer, schedule, step, loss_of, distributed)

    monkeypatch.setattr(hf, "reselect_step", counting_step)

    def moved_masks(growth_batches):
        torch.manual_seed(0)
        model = get_sparse_model(make_tiny_llama(), SparseConfig(density=0.05, value_dtype="float32"))
        args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=2, per_device_train_batch_size=2,
                                 learning_rate=1e-2, gradient_accumulation_steps=3, report_to=[], save_strategy="no",
                                 use_cpu=True, seed=0, remove_unused_columns=False, disable_tqdm=True)
        trainer = hf.SparseTrainer(model=model, args=args, train_dataset=ExampleDataset(examples),
                                   data_collator=lambda rows: collate(rows, tiny_tokenizer.pad_token_id),
                                   reselect_every=1, reselect_fraction=0.5, reselect_growth_batches=growth_batches)
        trainer.train()
        assert [step for step, _ in trainer.reselected] == [1]
        return {n: layer.indices.clone() for n, layer in model.sparse_layers().items()}

    one, two = moved_masks(1), moved_masks(2)
    assert ranked_over == [1, 2]  # the step's first micro-batch, then its first two
    assert any(not torch.equal(one[n], two[n]) for n in one)  # a second batch's gradient changes what grows

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=1, report_to=[], use_cpu=True,
                             gradient_accumulation_steps=2)
    sparse = get_sparse_model(make_tiny_llama(), SparseConfig(density=0.05))
    with pytest.raises(ConfigError, match=r"reselect_growth_batches=3 .* at most gradient_accumulation_steps \(2\)"):
        hf.SparseTrainer(model=sparse, args=args, reselect_every=2, reselect_growth_batches=3)
    with pytest.raises(ConfigError, match="applies only with reselect_every"):
        hf.SparseTrainer(model=sparse, args=args, reselect_growth_batches=2)
