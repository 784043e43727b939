"""One exception class per failure a user must be able to tell apart.

Every class derives from :class:`SparseFTError`, so ``except SparseFTError`` catches them all;
each also derives from the builtin a caller would naturally expect (``ValueError``,
``FileNotFoundError``) so generic handlers keep working.
"""


class SparseFTError(Exception):
    """Base class of every error sparseft raises on purpose."""


class ConfigError(SparseFTError, ValueError):
    """A SparseConfig field (or a CLI flag that feeds one) has an invalid value."""


class DiffNotFoundError(SparseFTError, FileNotFoundError):
    """The diff directory, or one of its files, does not exist."""


class DiffCorruptError(SparseFTError, ValueError):
    """A diff file exists but cannot be read: truncated, not JSON/safetensors, or inconsistent with itself."""


class UnsupportedFormatError(SparseFTError, ValueError):
    """The diff was written in a format version this sparseft does not read."""


class InvalidIndicesError(SparseFTError, ValueError):
    """Indices of a sparse delta are out of range, unsorted or duplicated."""


class ShapeMismatchError(SparseFTError, ValueError):
    """A tensor of the diff does not fit the base model (missing module or different shape)."""


class NonFiniteValuesError(SparseFTError, ValueError):
    """Values of a sparse delta contain NaN or Inf."""


class NonFiniteScoresError(SparseFTError, ValueError):
    """A scorer rated some entries of a module NaN or Inf, so no top-k of that module is meaningful."""


class DtypeMismatchError(SparseFTError, TypeError):
    """A tensor of the diff has a dtype other than the one its config declares."""


class FingerprintMismatchError(SparseFTError, ValueError):
    """The diff was made for a different base model than the one it is applied to."""


class UnverifiedBaseError(FingerprintMismatchError):
    """The diff records no base fingerprint, so nothing shows which base it was made for; loading it
    needs an explicit opt-out (``allow_unverified_base=True`` / ``--allow-unverified-base``)."""


class MergeStateError(SparseFTError, RuntimeError):
    """merge/unmerge called in the wrong state (e.g. unmerge without a prior merge)."""


class AtomicReplaceError(SparseFTError, OSError):
    """A finished output could not be renamed into place; the message names where the new version
    was left and where the old one is."""


class DataFormatError(SparseFTError, ValueError):
    """A training or evaluation data file has a malformed row."""


class ModelNotFoundError(SparseFTError, FileNotFoundError):
    """A model name is neither a known alias nor a local directory (and no hub access is possible), or
    what it names cannot be loaded (no or invalid config.json, missing or truncated weights, no tokenizer)."""


class ResultsFormatError(SparseFTError, ValueError):
    """A benchmark results.json is missing, not JSON, or lacks fields a report needs."""


class MaskFileError(SparseFTError, ValueError):
    """A mask file (written by ``sparseft select`` / ``save_masks``) is missing, unreadable or inconsistent."""


class NotReproducibleError(SparseFTError, ValueError):
    """A diff lacks what a re-run of its training needs (the training config, or a readable data file)."""


class UnknownDiffError(SparseFTError, LookupError):
    """A request or admin call names a diff (or a version of one) that the server has not loaded, or a
    ``SparseModel`` call names a diff it has not loaded (``set_active``, ``save_pretrained(diff_name=...)``)."""


class DiffRegistryError(SparseFTError, ValueError):
    """A serving registry operation is invalid: a bad diff name, no earlier version to roll back to,
    or a registry directory whose state can no longer be loaded."""


class InvalidModelError(DiffRegistryError):
    """A request's ``model`` is malformed (``NAME@VERSION`` whose version is not a number): the client's
    error in that field, where a well-formed name of no loaded diff is an :class:`UnknownDiffError`."""


class ServerBusyError(SparseFTError, RuntimeError):
    """The server's request queue is full; the client should retry later."""


class AdapterFormatError(SparseFTError, ValueError):
    """A PEFT adapter cannot be read as a sparse diff (missing files, an unsupported ``peft_type``, keys or
    shapes that do not fit), or a diff cannot be written as one (a layer too dense for SHiRA's ``r``)."""


class TaskFileError(ConfigError):
    """A task file (``--task path/to/task.yaml``) is unreadable or a key has a missing or invalid value
    (a ``ConfigError``, so code that checks task names catches it too)."""
