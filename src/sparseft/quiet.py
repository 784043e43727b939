"""Silence two import-time warnings of optional libraries that tell a user nothing they can act on.

torchao (the ``quant`` extra, also imported by ``peft`` whenever it is installed) logs, on every import:
- ``Failed to load …/_C_mxfp8…so`` / ``…/_C_cutlass_90a…so``: CUDA kernels for fp8 and Hopper matmuls,
  which fail to load without a GPU and which sparseft never calls (its int8/int4/nf4 bases are weight-only);
- torch's ``<enum '…'> is an Enum subclass … register_constant() … deprecated``: a note to torchao's
  authors about how torchao registers its enums.

Four such lines opened every ``sparseft train --method lora`` and every bench worker's log. The filters
drop only these messages; every other record of these loggers still reaches the user.
"""

from __future__ import annotations

import logging
import re

# (logger name, what the dropped message matches)
QUIETED = (
    ("torchao", re.compile(r"Failed to load .*_C_(mxfp8|cutlass)\w*\.")),
    ("torch.utils._pytree", re.compile(r"is an Enum subclass and is now natively supported")),
)


class DropMatching(logging.Filter):
    """Drop the records whose message matches ``pattern``."""

    def __init__(self, pattern: re.Pattern[str]):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_library_noise() -> None:
    """Install the filters (called once, at ``import sparseft``; a logger's filter is checked before its
    handlers, whoever configures them)."""
    for name, pattern in QUIETED:
        logging.getLogger(name).addFilter(DropMatching(pattern))
