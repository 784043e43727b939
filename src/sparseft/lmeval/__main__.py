"""``python -m sparseft.lmeval``: the ``lm_eval`` command line with the ``sparseft`` model type registered
(importing the package registers it, once). A sparseft error (a missing diff, one of another base, a bad
model_args value) is one ``error:`` line and exit status 2, as from the ``sparseft`` command, not a traceback."""

import sys

from lm_eval.__main__ import cli_evaluate

import sparseft.lmeval  # noqa: F401  (registers the model type)
from sparseft.errors import SparseFTError


def main() -> int:
    try:
        cli_evaluate()
    except SparseFTError as e:
        print(f"sparseft.lmeval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
