"""Resumable checkpoints without pickle: tensors in safetensors, scalars and layout in JSON.

A checkpoint directory ``out/checkpoints/step-000050/`` holds

- ``trainable.safetensors``: every trainable parameter by name (for a sparse run: the k values);
- ``optimizer.safetensors``: the optimizer's per-parameter state (``state.<i>.<key>``), the torch RNG
  states (``rng.cpu``, ``rng.cuda.<i>`` as uint8 tensors) and, for sparse runs, the masks
  (``mask.<module>``) so a resumed run does not depend on selecting again;
- ``state.json``: the step, the parameter names in optimizer order, the optimizer's param groups.

Together they let a resumed run continue exactly where the interrupted one stopped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_dir
from ..errors import ConfigError
from ..files import read_json_file

CHECKPOINTS_DIR = "checkpoints"


@dataclass
class Checkpoint:
    step: int
    params: dict[str, torch.Tensor]
    optimizer_state: dict
    rng: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    run_info: dict = field(default_factory=dict)


def checkpoint_dir(out: str | os.PathLike, step: int) -> Path:
    return Path(out) / CHECKPOINTS_DIR / f"step-{step:06d}"


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    root = Path(out) / CHECKPOINTS_DIR
    found = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []
    return found[-1] if found else None


def rng_tensors() -> dict[str, torch.Tensor]:
    states = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["rng.cpu"])
    count = sum(1 for key in rng if key.startswith("rng.cuda."))
    cuda = [rng[f"rng.cuda.{i}"] for i in range(count)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    path: Path,
    step: int,
    named_params: list[tuple[str, torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    masks: dict[str, torch.Tensor] | None = None,
    run_info: dict | None = None,
) -> Path:
    """Write a checkpoint atomically (a temporary sibling renamed into place). ``run_info`` records
    what must not change on resume (see :func:`check_resumable`)."""
    with atomic_dir(path) as tmp:
        params = {name: p.detach().cpu().contiguous() for name, p in named_params}
        save_file(params, str(tmp / "trainable.safetensors"))
        opt = optimizer.state_dict()
        tensors = {
            f"state.{i}.{key}": torch.as_tensor(value).detach().cpu().contiguous()
            for i, per_param in opt["state"].items()
            for key, value in per_param.items()
        }
        tensors.update({k: v.contiguous() for k, v in rng_tensors().items()})
        tensors.update({f"mask.{n}": m.detach().cpu().contiguous() for n, m in (masks or {}).items()})
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = {"step": step, "param_names": [n for n, _ in named_params], "param_groups": opt["param_groups"],
                 "run": run_info or {}}
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    return path


def check_checkpoint_dir(path: str | os.PathLike, flag: str | None = None) -> Path:
    """``path`` when it holds a checkpoint; ``flag``: the option that gave it, named in the error."""
    path = Path(path)
    named = f"{flag} {path}" if flag else str(path)
    if not path.is_dir():
        raise ConfigError(f"{named}: no such checkpoint directory")
    if not (path / "state.json").is_file():
        raise ConfigError(f"{named}: not a checkpoint directory (state.json missing)")
    return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = check_checkpoint_dir(path)
    state = read_json_file(path / "state.json", ConfigError)
    params = load_file(str(path / "trainable.safetensors"))
    tensors = load_file(str(path / "optimizer.safetensors"))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    optimizer_state = {"state": per_param, "param_groups": state["param_groups"]}
    return Checkpoint(
        step=int(state["step"]),
        params={name: params[name] for name in state["param_names"]},
        optimizer_state=optimizer_state,
        rng={k: v for k, v in tensors.items() if k.startswith("rng.")},
        masks={k[len("mask.") :]: v for k, v in tensors.items() if k.startswith("mask.")},
        run_info=state.get("run", {}),
    )


def check_resumable(ckpt: Checkpoint, run_info: dict, where: str) -> None:
    """A resumed run continues exactly only with the same data, method, batch layout and optimiser
    settings: refuse a checkpoint made under different ones, naming them."""
    changed = sorted(k for k in set(ckpt.run_info) | set(run_info) if ckpt.run_info.get(k) != run_info.get(k))
    if changed:
        detail = ", ".join(f"{k}: {ckpt.run_info.get(k)!r} -> {run_info.get(k)!r}" for k in changed)
        raise ConfigError(f"{where}: cannot resume, the run differs from the checkpoint's ({detail})")


def restore_checkpoint(
    ckpt: Checkpoint, named_params: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer, where: str
) -> None:
    """Copy the saved parameters and optimizer state into a freshly built run (same parameter names)."""
    names = [n for n, _ in named_params]
    if names != list(ckpt.params):
        raise ConfigError(f"{where}: the checkpoint trains different parameters than this run (method or targets changed?)")
    with torch.no_grad():
        for name, p in named_params:
            p.copy_(ckpt.params[name].to(p.device))
    optimizer.load_state_dict(ckpt.optimizer_state)
    restore_rng(ckpt.rng)
