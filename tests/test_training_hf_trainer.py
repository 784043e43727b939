"""A SparseModel is a plain nn.Module whose only trainable parameters are the values, so the
Hugging Face Trainer trains it as is; save_pretrained then writes the diff."""

import torch
from transformers import Trainer, TrainingArguments

from conftest import make_tiny_llama
from sparseft import SparseConfig, SparseModel, get_sparse_model
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
