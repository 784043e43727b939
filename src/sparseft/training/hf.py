"""Hugging Face ``Trainer`` interop with dynamic re-selection.

A ``SparseModel`` trains under the plain ``transformers.Trainer`` as it is: its only trainable
parameters are the values. ``SparseTrainer`` adds what the plain one cannot do, re-selecting the mask
every ``reselect_every`` optimizer steps as ``sparseft train`` does (see
``sparseft.training.reselect``): on the step's first micro-batch, before its forward, with the
optimizer's moments carried along. ``reselect_growth_batches=N`` ranks the entries to grow by the
summed gradient of the step's first N micro-batches; unlike ``sparseft train``, which reads on into
the following steps' data, N is at most ``gradient_accumulation_steps`` (the Trainer fetches one
step's micro-batches at a time).

Example:
    >>> trainer = SparseTrainer(model=sparse_model, args=args, train_dataset=data,
    ...                         reselect_every=50, reselect_fraction=0.1)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as torch_dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from ..errors import ConfigError
from ..selection.maskio import load_masks, save_masks
from .config import check_reselect_ranges
from .loop import live_masks, reselect_step, sparse_layers_of
from .reselect import ReselectSchedule

MASKS_FILE = "sparse_masks.safetensors"  # beside each Trainer checkpoint: the masks as they had moved


class SparseTrainer(Trainer):
    """``transformers.Trainer`` plus re-selection; with ``reselect_every=0`` it is the plain Trainer.

    ``reselected`` lists ``(step, entries swapped)`` for every re-selection, for logs and tests.
    """

    def __init__(self, *args, reselect_every: int = 0, reselect_fraction: float = 0.1, reselect_growth_batches: int = 1,
                 **kwargs):
        super().__init__(*args, **kwargs)
        check_reselect_ranges(reselect_every, reselect_fraction, reselect_growth_batches)
        if reselect_every and sparse_layers_of(self.model) is None:
            raise ConfigError("reselect_every needs a SparseModel (from get_sparse_model) to move its mask")
        if reselect_growth_batches > self.args.gradient_accumulation_steps:
            raise ConfigError(f"reselect_growth_batches={reselect_growth_batches} ranks growth over one step's own "
                              f"micro-batches here: at most gradient_accumulation_steps "
                              f"({self.args.gradient_accumulation_steps}); raise that or lower this")
        self.reselect_every, self.reselect_fraction = reselect_every, reselect_fraction
        self.reselect_growth_batches = reselect_growth_batches
        self._step_batches: list = []  # the micro-batches of the step being run, as the Trainer fetched them
        self.reselected: list[tuple[int, int]] = []
        self._last_reselect_step: int | None = None
        if reselect_every:
            self.add_callback(SaveMasksWithCheckpoints(self))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """``Trainer.train``; a resumed run first puts back the masks its checkpoint was saved with."""
        if resume_from_checkpoint and self.reselect_every:
            checkpoint = resume_from_checkpoint
            if checkpoint is True:
                checkpoint = get_last_checkpoint(self.args.output_dir)  # None: Trainer.train says none was found
            if checkpoint is not None:
                restore_masks(self.model, Path(checkpoint) / MASKS_FILE)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """``Trainer.get_batch_samples``, keeping the step's micro-batches for the growth ranking."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_batches = batches
        return batches, num_items

    def training_step(self, model, inputs, *args, **kwargs):
        step = self.state.global_step  # optimizer steps done; unchanged over a step's micro-batches
        schedule = ReselectSchedule(self.reselect_every, self.reselect_fraction, self.state.max_steps)
        if schedule.due(step) and step != self._last_reselect_step:
            self._last_reselect_step = step
            distributed = torch_dist.is_initialized() and torch_dist.get_world_size() > 1
            batches = [self._prepare_inputs(b) for b in self.growth_inputs(inputs)]
            losses = [lambda m, b=b: m(**b).loss for b in batches]
            swapped = reselect_step(model, self.optimizer, schedule, step, losses, distributed)
            self.reselected.append((step, swapped))
        return super().training_step(model, inputs, *args, **kwargs)

    def growth_inputs(self, inputs) -> list:
        """The micro-batches that rank growth: ``inputs`` (the step's first) and the next of its step, up to
        ``reselect_growth_batches`` (fewer at the end of the data)."""
        step_batches = self._step_batches
        if not step_batches or step_batches[0] is not inputs:  # called outside Trainer's loop: this batch alone
            return [inputs]
        return step_batches[:self.reselect_growth_batches]


class SaveMasksWithCheckpoints(TrainerCallback):
    """Writes the live masks into every checkpoint folder: the Trainer saves values, not indices."""

    def __init__(self, trainer: SparseTrainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            model = self.trainer.model
            layers = sparse_layers_of(model)
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            save_masks(folder / MASKS_FILE, live_masks(model, None),
                       {n: tuple(layer.weight.shape) for n, layer in layers.items()}, model.sparse_config)


@torch.no_grad()
def restore_masks(model, path: Path) -> None:
    """Move each layer's indices back to those of ``path`` (same k per module: values load after)."""
    if not path.is_file():
        raise ConfigError(f"{path} not found: a SparseTrainer with reselect_every resumes only from checkpoints "
                          f"it wrote itself (they hold the moved masks)")
    masks, layers = load_masks(path), sparse_layers_of(model)
    if set(masks) != set(layers):
        raise ConfigError(f"{path}: masks for {sorted(set(masks) ^ set(layers))} do not match the model's sparse modules")
    for name, layer in layers.items():
        if masks[name].numel() != layer.indices.numel():
            raise ConfigError(f"{path}: module {name} has {masks[name].numel()} entries, the model {layer.indices.numel()}")
    for name, layer in layers.items():
        layer.indices.copy_(masks[name])


__all__ = ["SparseTrainer"]
