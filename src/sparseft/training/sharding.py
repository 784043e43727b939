"""FSDP2 for sparse runs: the frozen base sharded across processes, the k values replicated.

A sparse run trains k values over a frozen base, so the base is most of what a process holds. Under
``--fsdp`` each process keeps 1/N of it (``torch.distributed.fsdp.fully_shard`` on every decoder
layer and on the model for the rest: embeddings, final norm, head); a layer's weights are gathered
only while its forward or backward runs. The values stay plain replicated tensors: they are passed
to ``fully_shard`` as ``ignored_params`` (not sharded, no reduce-scatter), and their gradients are
averaged over processes here, the way DDP averages them, so the loop, the optimizer and the
checkpoints see the same parameters as in one process.

The weight is a sharded DTensor outside its layer's forward, so the delta cannot be written into it:
the layers run ``forward_mode="unmerged"`` (``y = base(x) + Δ(x)``, the weight only read).

Selection happens before sharding (every process holds the whole base while it loads and selects),
so data scorers see full gradients and every rank chooses the same entries; re-selection during
training would need dense gradients of sharded weights and is refused (``check_fsdp_config``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as torch_dist
from torch import nn

from ..errors import ConfigError
from ..methods import get_method, training_methods
from ..model import SparseModel
from ..sparse_linear import set_kernels


def check_fsdp_config(method: str, reselecting: bool) -> None:
    """Refuse what FSDP sharding cannot do (called when the config is read)."""
    if not get_method(method).shards_base:
        able = [name for name in training_methods() if get_method(name).shards_base]
        raise ConfigError(f"fsdp shards the frozen base of a {'/'.join(able)} run; method={method!r} trains "
                          "the base weights themselves (use DDP, the default, for it)")
    if reselecting:
        raise ConfigError("fsdp cannot be combined with reselect_every: re-selection ranks entries by dense "
                          "gradients of whole weights, which no process holds when the base is sharded")


def sharded_units(model: SparseModel) -> list[nn.Module]:
    """The blocks sharded one by one: the modules whose class the HF model lists in ``_no_split_modules``
    (its decoder layers), in model order."""
    names = set(getattr(model.base_model, "_no_split_modules", None) or ())
    units = [m for m in model.base_model.modules() if type(m).__name__ in names]
    if not units:
        raise ConfigError(f"fsdp: {type(model.base_model).__name__} names no decoder-layer class in "
                          "_no_split_modules, so there is nothing to shard layer by layer")
    return units


class ShardedSparseModel(nn.Module):
    """A SparseModel whose base is sharded with FSDP2 across the process group; ``module`` is it.

    Like ``DistributedDataParallel`` for the loop: ``forward`` runs the model, ``no_sync()`` skips the
    values' gradient averaging on accumulation micro-batches, and after a synced backward every
    process holds the same (averaged) gradient.
    """

    def __init__(self, model: SparseModel, device: torch.device, world_size: int):
        super().__init__()
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.module = model
        self.world_size = world_size
        self._sync = True
        set_kernels(model, forward_mode="unmerged")
        values = set(model.sparse_parameters())
        mesh = init_device_mesh(device.type, (world_size,))
        for unit in sharded_units(model):
            fully_shard(unit, mesh=mesh, ignored_params=values)
        fully_shard(model, mesh=mesh, ignored_params=values)
        for p in values:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._average_gradient)

    def _average_gradient(self, param: nn.Parameter) -> None:
        # Backward runs the same graph in the same order on every rank, so these collectives line up.
        if self._sync:
            torch_dist.all_reduce(param.grad, op=torch_dist.ReduceOp.SUM)
            param.grad.div_(self.world_size)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (the next synced backward averages the sum)."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def shard_sparse_model(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """``model`` sharded across ``world_size`` processes (one process: returned as it is)."""
    if world_size <= 1:
        return model
    if not isinstance(model, SparseModel):
        raise ConfigError(f"fsdp shards a SparseModel's frozen base, got {type(model).__name__}")
    return ShardedSparseModel(model, device, world_size)


def local_parameter_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters this process holds: the base (its shard, when sharded) and the trainable values."""
    held = {"base": 0, "trainable": 0}
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        held["trainable" if p.requires_grad else "base"] += local.numel() * local.element_size()
    return held
