"""``python -m sparseft.lmeval``: the ``lm_eval`` command line with the ``sparseft`` model type registered
(importing the package registers it, once)."""

from lm_eval.__main__ import cli_evaluate

import sparseft.lmeval  # noqa: F401  (registers the model type)

if __name__ == "__main__":
    cli_evaluate()
