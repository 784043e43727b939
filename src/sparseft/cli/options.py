"""Options several verbs share, written once: the model to load and its dtype, and help that shows
the defaults a verb takes from TrainConfig / SparseConfig (so ``select`` and ``train`` agree)."""

from __future__ import annotations

import argparse

from ..config import DTYPES
from ..quantize import QUANT_SCHEMES


def positive_int(text: str) -> int:
    """argparse ``type=`` for a count that must be at least 1 (batch sizes, limits, threads, queue lengths):
    0 or a negative number is refused at the flag, before anything loads."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def add_model_options(
    parser: argparse.ArgumentParser, required: bool = True, what: str = "base model", dtype_default: str | None = "float32",
    why: str = "",
) -> None:
    """``--model`` (``what``: an alias, local directory or HF id; ``why``: what the verb does with it)
    and ``--dtype`` to load it in.

    ``dtype_default=None`` leaves ``--dtype`` "not given" (train: the value may come from --config).
    """
    why = f" ({why})" if why else ""
    parser.add_argument("--model", required=required, metavar="BASE",
                        help=f"{what}: alias (e.g. smollm2-135m), local directory or HF id{why}")
    default = f" (default: {dtype_default})" if dtype_default else ""
    parser.add_argument("--dtype", choices=list(DTYPES), default=dtype_default, help=f"dtype to load the model in{default}")


def add_quantize_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, what: str, which: str) -> None:
    """``--quantize int8|int4|nf4|q4_1``: ``what`` (e.g. "train over") a weight-only quantized base, for
    ``which`` (e.g. "sparse runs"): the one definition train, eval, apply, verify, audit, serve, compose and
    diff-stats share."""
    parser.add_argument("--quantize", choices=list(QUANT_SCHEMES),
                        help=f"{what} a weight-only quantized base ({which}; int8/int4/nf4 need sparseft[quant]); "
                        "nf4: QLoRA's 4-bit NormalFloat, two codes per byte; q4_1: GGUF's Q4_1 blocks (embedding "
                        "Q8_0), which hold smollm2-135m exactly since it ships as a Q4_1 GGUF")


def add_unverified_base_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--allow-unverified-base``: ``what`` (e.g. "apply a diff") also for a diff that records no base
    fingerprint, with a logged warning, instead of refusing it (``UnverifiedBaseError``)."""
    parser.add_argument("--allow-unverified-base", action="store_true",
                        help=f"also {what} that records no base fingerprint (logged as a warning; default: refuse it)")


class TrainConfigDefaults(argparse.HelpFormatter):
    """Help that ends each flag with the TrainConfig default it falls back to (selection fields included).

    The flags themselves default to None ("not given"), so values from --config are not overridden;
    argparse's ArgumentDefaultsHelpFormatter would print that None after every flag. TrainConfig is
    imported only when help is shown.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = config_default(action.dest)
        if action.nargs == 0 or default in (None, "", [], {}) or not action.option_strings:
            return text  # switches, and fields whose absence the help text explains
        if isinstance(default, list):
            default = ", ".join(default)
        if isinstance(default, dict):
            default = ",".join(f"{k}={v:g}" for k, v in default.items())
        return f"{text} (default: {default})".replace("%", "%%")


def config_default(name: str):
    """TrainConfig's default for the flat field ``name`` (a selection field: its ``selection``'s default)."""
    return train_defaults().get(name)


def train_defaults() -> dict:
    from ..training.config import TrainConfig

    return TrainConfig().to_dict()
