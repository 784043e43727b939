"""Finding the ``nn.Linear`` modules a config targets."""

from __future__ import annotations

from torch import nn

from .errors import ConfigError


def matches(name: str, target_modules: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_targets(model: nn.Module, target_modules: list[str]) -> dict[str, nn.Linear]:
    """``{qualified_name: linear}`` for every ``nn.Linear`` whose name matches ``target_modules``."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and matches(name, target_modules)}
    if not found:
        linear_names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"no nn.Linear module matches target_modules={target_modules}; this model has {linear_names}")
    return found
